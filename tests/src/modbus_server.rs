//! A real Modbus TCP server per test: pymodbus (Debian `python3-pymodbus`) running
//! `modbus/server.py` on a loopback port it binds itself (port 0) and reports, whose registers
//! the test sets over stdin. It can be paused (SIGSTOP: connections stay open, nothing answers) to play a controller that hangs.

use std::process::Stdio;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::timeout;

use crate::READY_TIMEOUT;

/// The Python that has the Debian `python3-pymodbus` package (not a pyenv or venv shim).
pub const MODBUS_PYTHON: &str = "/usr/bin/python3";

const SCRIPT: &str = include_str!("modbus/server.py");

/// Which register table a `set` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterTable {
    Input,
    Holding,
}

/// A running pymodbus server; dropped, it is killed.
#[derive(Debug)]
pub struct ModbusServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ModbusServer {
    /// Starts a server answering for `units`; returns once it accepts TCP connections.
    pub async fn start(units: &[u8]) -> anyhow::Result<ModbusServer> {
        let probe = std::process::Command::new(MODBUS_PYTHON).args(["-c", "import pymodbus"]).output();
        if !probe.map(|o| o.status.success()).unwrap_or(false) {
            bail!("pymodbus is not installed for {MODBUS_PYTHON}: run `scripts/test`, which installs the Debian package python3-pymodbus");
        }
        let dir = tempfile::Builder::new().prefix("citywatch-modbus-").tempdir().context("temp dir")?;
        let script = dir.path().join("server.py");
        std::fs::write(&script, SCRIPT).context("writing server.py")?;
        let units: Vec<String> = units.iter().map(u8::to_string).collect();
        let mut child = Command::new(MODBUS_PYTHON)
            .arg(&script)
            .arg("0")
            .arg(units.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).context("stderr.log")?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning the pymodbus server")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        // Its first line, once listening: "listening PORT". End of output: it exited.
        let mut first = String::new();
        let read = timeout(READY_TIMEOUT, stdout.read_line(&mut first)).await;
        let port = first.strip_prefix("listening ").and_then(|p| p.trim().parse::<u16>().ok());
        let mut server = ModbusServer { child, stdin, stdout, port: port.unwrap_or(0), _dir: dir };
        match (read, port) {
            (Ok(Ok(_)), Some(_)) => Ok(server),
            (Err(_), _) => bail!("the pymodbus server did not listen within {READY_TIMEOUT:?}:\n{}", server.stderr()),
            _ => {
                let status = timeout(READY_TIMEOUT, server.child.wait()).await.ok().and_then(Result::ok);
                bail!("the pymodbus server did not start ({first:?}, exit {status:?}):\n{}", server.stderr())
            }
        }
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sets registers from `address` on; returns once the server has applied them.
    pub async fn set(&mut self, unit: u8, table: RegisterTable, address: u16, values: &[u16]) -> anyhow::Result<()> {
        let table = match table {
            RegisterTable::Input => "input",
            RegisterTable::Holding => "holding",
        };
        let values: Vec<String> = values.iter().map(u16::to_string).collect();
        let line = format!("set {unit} {table} {address} {}\n", values.join(" "));
        self.stdin.write_all(line.as_bytes()).await.context("writing to the server")?;
        self.stdin.flush().await?;
        let mut answer = String::new();
        timeout(READY_TIMEOUT, self.stdout.read_line(&mut answer)).await.context("no answer to set")??;
        if answer.trim() != "ok" {
            bail!("the server answered {answer:?} to {line:?}:\n{}", self.stderr());
        }
        Ok(())
    }

    /// Freezes the server (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused server answer again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("the server has exited")?;
        let status = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status()?;
        if !status.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// The server's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for ModbusServer {
    fn drop(&mut self) {
        // A paused process must be continued to die promptly; kill_on_drop sends SIGKILL.
        let _ = self.resume();
    }
}
