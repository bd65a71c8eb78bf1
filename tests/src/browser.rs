//! A real headless Chromium driven over the W3C WebDriver protocol: `chromedriver` (Debian
//! `chromium-driver`) started on a free port, readiness polled on `/status`, one session with a
//! fresh profile, and the few commands the dashboard tests need (navigate, run a script, find,
//! click, type, screenshot). A small client over `ureq` rather than a WebDriver crate: the
//! protocol is plain JSON and the harness already speaks HTTP. Calls block; every wait is bounded.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::{find_executable, free_port, workspace_root, ChildGuard, READY_TIMEOUT};

/// The W3C key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where the Debian packages put the browser and its driver.
const BROWSER_DIRS: &[&str] = &["/usr/bin", "/usr/lib/chromium"];

/// The chromedriver executable, if installed.
pub fn chromedriver_path() -> Option<PathBuf> {
    find_executable("chromedriver", BROWSER_DIRS)
}

/// The Chromium executable, if installed.
pub fn chromium_path() -> Option<PathBuf> {
    find_executable("chromium", BROWSER_DIRS).or_else(|| find_executable("chromium-browser", BROWSER_DIRS))
}

/// `target/test-artifacts/{group}` (created), where screenshots are kept after the run.
pub fn artifacts_dir(group: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), |d| workspace_root().join(d));
    let dir = target.join("test-artifacts").join(group);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A chromedriver process with one browser session. Dropping it ends the session (closing the
/// browser) and then kills the driver.
#[derive(Debug)]
pub struct Browser {
    base: String,
    session: String,
    agent: ureq::Agent,
    driver: ChildGuard,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium with a fresh profile and a
    /// `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        let driver_bin = chromedriver_path().context("chromedriver is not installed (Debian package chromium-driver)")?;
        let chromium = chromium_path().context("chromium is not installed (Debian package chromium)")?;
        let port = free_port();
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
        let mut driver = ChildGuard::spawn("chromedriver", cmd)?;
        let base = format!("http://127.0.0.1:{port}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let ready = agent
                .get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            if let Some(status) = driver.try_wait()? {
                bail!("chromedriver exited with {status} before it was ready:\n{}", driver.logs());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("chromedriver not ready within {READY_TIMEOUT:?}:\n{}", driver.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::Builder::new().prefix("citywatch-chromium-").tempdir().context("profile dir")?;
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--autoplay-policy=no-user-gesture-required".to_owned(),
            "--lang=zh-CN".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let mut browser = Browser { base, session: String::new(), agent, driver, _profile: profile };
        let created = browser.call("POST", "/session", Some(&caps)).context("creating a browser session")?;
        browser.session = created["sessionId"].as_str().context("no sessionId in the new session")?.to_owned();
        Ok(browser)
    }

    /// One WebDriver command; returns its `value`, or the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, Some(b)) => self.agent.post(&url).send_json(b),
            (_, None) => self.agent.post(&url).send_json(json!({})),
        }
        .with_context(|| format!("{method} {path}"))?;
        let status = response.status().as_u16();
        let answer: Value = response.body_mut().read_json().with_context(|| format!("{method} {path}: body"))?;
        if status >= 400 {
            bail!("{method} {path}: {status} {}: {}", answer["value"]["error"], answer["value"]["message"]);
        }
        Ok(answer["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.session_call("POST", "/url", Some(&json!({ "url": url }))).map(drop)
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page; its return value.
    pub fn script(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.session_call("POST", "/execute/sync", Some(&json!({ "script": script, "args": args })))
    }

    /// Runs an asynchronous `script`: it ends by calling its last argument with the result.
    pub fn script_async(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.session_call("POST", "/execute/async", Some(&json!({ "script": script, "args": args })))
    }

    /// The first element matching the CSS `selector`, if any.
    pub fn find(&self, selector: &str) -> anyhow::Result<Option<Element<'_>>> {
        match self.session_call("POST", "/element", Some(&json!({ "using": "css selector", "value": selector }))) {
            Ok(v) => Ok(Some(Element { browser: self, id: v[ELEMENT_KEY].as_str().context("element reference")?.to_owned() })),
            Err(e) if e.to_string().contains("no such element") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Clicks the first element matching `selector`, finding it again if the page re-rendered
    /// it between the find and the click (a stale reference); fails if none matches.
    pub fn click(&self, selector: &str) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            let element = self.find(selector)?.with_context(|| format!("no element {selector:?} to click"))?;
            match element.click() {
                Ok(()) => return Ok(()),
                Err(e) if e.to_string().contains("stale element") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("clicking {selector:?}")))
    }

    /// Polls the CSS `selector` until it matches (bounded by `within`).
    pub async fn wait_for_element(&self, selector: &str, within: Duration) -> anyhow::Result<Element<'_>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.find(selector)? {
                return Ok(e);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no element {selector:?} within {within:?}; page text:\n{}", self.page_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls a script until it returns something other than null/false (bounded by `within`).
    pub async fn wait_for_script(&self, what: &str, script: &str, within: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.script(script, &[])?;
            if !(v.is_null() || v == false) {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{what}: not within {within:?}; page text:\n{}", self.page_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The visible text of the page (for failure messages).
    pub fn page_text(&self) -> String {
        self.script("return document.body ? document.body.innerText : ''", &[])
            .ok()
            .and_then(|v| v.as_str().map(|s| crate::tail(s, 60)))
            .unwrap_or_default()
    }

    /// The page's console messages are not kept by chromedriver without logging prefs; the
    /// driver's own output is, for failure reports.
    pub fn driver_logs(&self) -> String {
        self.driver.logs()
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let b64 = self.session_call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("screenshot is not a string")?)
            .context("screenshot is not base64")?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session, which closes Chromium; the driver is killed after (ChildGuard).
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
    }
}

/// An element of the page.
#[derive(Debug)]
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    pub fn click(&self) -> anyhow::Result<()> {
        self.browser.session_call("POST", &format!("/element/{}/click", self.id), None).map(drop)
    }

    /// Types `text` into it (after what it already holds).
    pub fn type_text(&self, text: &str) -> anyhow::Result<()> {
        self.browser.session_call("POST", &format!("/element/{}/value", self.id), Some(&json!({ "text": text }))).map(drop)
    }

    pub fn clear(&self) -> anyhow::Result<()> {
        self.browser.session_call("POST", &format!("/element/{}/clear", self.id), None).map(drop)
    }

    pub fn text(&self) -> anyhow::Result<String> {
        Ok(self.browser.session_call("GET", &format!("/element/{}/text", self.id), None)?.as_str().unwrap_or_default().to_owned())
    }

    pub fn attribute(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self.browser.session_call("GET", &format!("/element/{}/attribute/{name}", self.id), None)?.as_str().map(str::to_owned))
    }
}
