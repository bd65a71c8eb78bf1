//! A real headless Chromium driven over WebDriver through the maintained `fantoccini` client:
//! `chromedriver` (Debian `chromium-driver`) started by us on a port it picks itself, one session
//! with a fresh profile, and the few commands the dashboard tests need (navigate, run a script,
//! find, click, type, screenshot, find by text). This module only starts the driver and wraps
//! fantoccini's errors into `anyhow` with the page text; it does not speak the protocol itself.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use crate::{find_executable, wait_for_async, workspace_root, ChildGuard, READY_TIMEOUT};

/// Where the Debian packages put the browser and its driver.
const BROWSER_DIRS: &[&str] = &["/usr/bin", "/usr/lib/chromium"];

/// How chromedriver announces its port (with `--port=0` it binds a port of its own choosing).
const STARTED_ON_PORT: &str = "was started successfully on port ";

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
/// browser) and then kills the driver; [`Browser::close`] does the same and reports errors.
#[derive(Debug)]
pub struct Browser {
    client: Client,
    base: String,
    session: Option<String>,
    driver: ChildGuard,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a port of its choosing and a headless Chromium with a fresh
    /// profile and a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        let driver_bin = chromedriver_path().context("chromedriver is not installed (Debian package chromium-driver)")?;
        let chromium = chromium_path().context("chromium is not installed (Debian package chromium)")?;
        let mut cmd = Command::new(&driver_bin);
        cmd.arg("--port=0").arg("--allowed-ips=127.0.0.1");
        let mut driver = ChildGuard::spawn("chromedriver", cmd)?;
        let port: u16 = wait_for_async("chromedriver to announce its port", READY_TIMEOUT, || {
            let announced = driver.stdout().lines().find_map(|l| l.split_once(STARTED_ON_PORT).and_then(|(_, p)| p.trim_end_matches('.').trim().parse::<u16>().ok()));
            let exited = driver.try_wait().ok().flatten();
            async move {
                match (announced, exited) {
                    (Some(port), _) => Some(Ok(port)),
                    (None, Some(status)) => Some(Err(status)),
                    (None, None) => None,
                }
            }
        })
        .await
        .with_context(|| driver.logs())?
        .map_err(|status| anyhow::anyhow!("chromedriver exited with {status} before it was ready:\n{}", driver.logs()))?;
        let base = format!("http://127.0.0.1:{port}");
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
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), json!({"binary": chromium, "args": args}));
        // chromedriver plain HTTP on loopback: no TLS connector needed.
        let client = tokio::time::timeout(READY_TIMEOUT * 6, ClientBuilder::new(HttpConnector::new()).capabilities(caps).connect(&base))
            .await
            .map_err(|_| anyhow::anyhow!("no browser session within {:?}:\n{}", READY_TIMEOUT * 6, driver.logs()))?
            .with_context(|| format!("creating a browser session:\n{}", driver.logs()))?;
        let session = client.session_id().await.context("session id")?;
        Ok(Browser { client, base, session, driver, _profile: profile })
    }

    /// The fantoccini client, for anything this helper does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await.with_context(|| format!("navigate to {url}"))
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page; its return value.
    pub async fn script(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.client.execute(script, args.to_vec()).await.with_context(|| format!("script {script:?}"))
    }

    /// Runs an asynchronous `script`: it ends by calling its last argument with the result.
    pub async fn script_async(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.client.execute_async(script, args.to_vec()).await.context("async script")
    }

    /// The first element matching the CSS `selector`, if any.
    pub async fn find(&self, selector: &str) -> anyhow::Result<Option<Element>> {
        match self.client.find(Locator::Css(selector)).await {
            Ok(e) => Ok(Some(Element(e))),
            Err(e) if e.is_no_such_element() => Ok(None),
            Err(e) => Err(e).with_context(|| format!("find {selector:?}")),
        }
    }

    /// The first element whose own visible text contains `text`, if any.
    pub async fn find_text(&self, text: &str) -> anyhow::Result<Option<Element>> {
        // XPath string literal: concat() handles a text holding both quote kinds.
        let literal = format!("concat('{}', '')", text.replace('\'', "', \"'\", '"));
        let xpath = format!("//*[contains(text(), {literal})]");
        match self.client.find(Locator::XPath(&xpath)).await {
            Ok(e) => Ok(Some(Element(e))),
            Err(e) if e.is_no_such_element() => Ok(None),
            Err(e) => Err(e).with_context(|| format!("find text {text:?}")),
        }
    }

    /// Clicks the first element matching `selector`, finding it again if the page re-rendered
    /// it between the find and the click (a stale reference); fails if none matches.
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            let element = self.find(selector).await?.with_context(|| format!("no element {selector:?} to click"))?;
            match element.0.click().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_stale_element_reference() => last = Some(e),
                Err(e) => return Err(e).with_context(|| format!("click {selector:?}")),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("clicking {selector:?}"), |e| anyhow::anyhow!("click {selector:?}: {e}")))
    }

    /// Waits (bounded by `within`) until the CSS `selector` matches.
    pub async fn wait_for_element(&self, selector: &str, within: Duration) -> anyhow::Result<Element> {
        match wait_for_async(&format!("element {selector:?}"), within, || async { self.find(selector).await.transpose() }).await {
            Ok(found) => found,
            Err(e) => bail!("{e}; page text:\n{}", self.page_text().await),
        }
    }

    /// Waits (bounded by `within`) until a script returns something other than null/false.
    pub async fn wait_for_script(&self, what: &str, script: &str, within: Duration) -> anyhow::Result<Value> {
        let probe = || async {
            match self.script(script, &[]).await {
                Ok(v) if v.is_null() || v == false => None,
                other => Some(other),
            }
        };
        match wait_for_async(what, within, probe).await {
            Ok(value) => value,
            Err(e) => bail!("{e}; page text:\n{}", self.page_text().await),
        }
    }

    /// The visible text of the page (for failure messages).
    pub async fn page_text(&self) -> String {
        self.script("return document.body ? document.body.innerText : ''", &[])
            .await
            .ok()
            .and_then(|v| v.as_str().map(|s| crate::tail(s, 60)))
            .unwrap_or_default()
    }

    /// The driver's own output, for failure reports.
    pub fn driver_logs(&self) -> String {
        self.driver.logs()
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let png = self.client.screenshot().await.context("screenshot")?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session (closing Chromium), then the driver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.session = None;
        self.client.clone().close().await.context("closing the browser session")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Drop cannot await fantoccini's close: end the session with one blocking DELETE, which
        // closes Chromium; the driver is killed after (ChildGuard).
        if let Some(session) = self.session.take() {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(READY_TIMEOUT)).build().into();
            let _ = agent.delete(&format!("{}/session/{session}", self.base)).call();
        }
    }
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(pub fantoccini::elements::Element);

impl Element {
    pub async fn click(&self) -> anyhow::Result<()> {
        self.0.click().await.context("click")
    }

    /// Types `text` into it (after what it already holds).
    pub async fn type_text(&self, text: &str) -> anyhow::Result<()> {
        self.0.send_keys(text).await.context("type")
    }

    pub async fn clear(&self) -> anyhow::Result<()> {
        self.0.clear().await.context("clear")
    }

    pub async fn text(&self) -> anyhow::Result<String> {
        self.0.text().await.context("text")
    }

    pub async fn attribute(&self, name: &str) -> anyhow::Result<Option<String>> {
        self.0.attr(name).await.with_context(|| format!("attribute {name}"))
    }
}
