//! A run's page in headless chromium, for the scenarios: runs `tests/browser/run-page.mjs`
//! with node (playwright-core from the web UI tests' `relay/ui/tests/node_modules`, which
//! `scripts/deps/ui-node-modules.sh` installs) and reads the JSON lines it prints.
//!
//! Missing node, node modules or chromium fail the test with what to install; nothing is
//! skipped (CI installs all three).

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn workspace() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The page, open in a browser driven by a node process (its own process group, killed with
/// its chromium on drop).
pub struct RunPage {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: PathBuf,
}

impl RunPage {
    /// Opens `url` and waits for nothing yet; [`RunPage::next`] reads each step.
    pub fn open(
        url: &str,
        variation: &str,
        first: &str,
        after: &str,
        log_dir: &std::path::Path,
    ) -> RunPage {
        let ws = workspace();
        let modules = ws.join("relay/ui/tests/node_modules/playwright-core");
        assert!(
            modules.is_dir(),
            "{} is missing: run scripts/deps/ui-node-modules.sh (npm ci in relay/ui/tests), as scripts/test.sh does",
            modules.display()
        );
        let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
        let stderr = log_dir.join("browser.log");
        let err = std::fs::File::create(&stderr).expect("browser log");
        let mut child = Command::new(&node)
            .arg(ws.join("e2e/tests/browser/run-page.mjs"))
            .args([url, variation, first, after])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("run {node} (scripts/deps/browser.sh installs node and chromium): {e}")
            });
        let stdout = child.stdout.take().expect("piped stdout");
        RunPage {
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
        }
    }

    /// The next step the page reports; it must be `event`, within `secs`.
    pub async fn next(&mut self, event: &str, secs: u64) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(secs), self.lines.next_line()).await;
        let log = || std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let line = match line {
            Err(_) => panic!(
                "the browser did not report `{event}` within {secs}s; its log:\n{}",
                log()
            ),
            Ok(Err(e)) => panic!("reading the browser driver's output: {e}"),
            Ok(Ok(None)) => panic!(
                "the browser driver exited before `{event}`; its log:\n{}",
                log()
            ),
            Ok(Ok(Some(line))) => line,
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the browser driver printed {line:?}: {e}"));
        if v["event"] == "error" {
            panic!(
                "the browser failed before `{event}`: {}\nits log:\n{}",
                v["message"].as_str().unwrap_or_default(),
                log()
            );
        }
        assert_eq!(v["event"], event, "{v}");
        v
    }
}

impl RunPage {
    /// Waits for the driver to close the browser and exit successfully.
    pub async fn close(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await;
        match status {
            Ok(Ok(st)) => assert!(
                st.success(),
                "the browser driver exited with {st}; its log:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ),
            Ok(Err(e)) => panic!("waiting for the browser driver: {e}"),
            Err(_) => panic!("the browser driver did not exit within 40s"),
        }
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The whole group: node and the chromium it started.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
