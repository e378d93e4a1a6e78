//! The one process guard `dist`, `image`, `bench` and `netboot` share: a child that is
//! stopped and reaped when the guard is dropped, so an early return or a panic in a
//! harness never leaves a server or a VM running.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process, stopped on drop: SIGTERM first when a grace period is set (for
/// servers that take their workers down themselves, like nginx), then SIGKILL to its
/// process group when it leads one, then to the child itself; always reaped.
pub struct Guard {
    pub child: Child,
    pub what: String,
    /// Whether the child leads its own process group (spawned here).
    group: bool,
    grace: Option<Duration>,
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …) while `pid` lives.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Guard {
    /// Starts `program args…` in its own process group with stdout and stderr to
    /// `log`; through setpriv's parent-death signal it also dies with xtask.
    pub fn spawn(what: &str, program: &str, args: &[&str], log: &Path) -> Result<Guard> {
        Guard::spawn_via(&[], what, program, args, log)
    }

    /// As [`Guard::spawn`], with `launcher` (such as `ip netns exec NAME`, which execs
    /// what follows, so the PID stays the child's) in front.
    pub fn spawn_via(
        launcher: &[&str],
        what: &str,
        program: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<Guard> {
        let mut c = Command::new(launcher.first().copied().unwrap_or("setpriv"));
        if !launcher.is_empty() {
            c.args(&launcher[1..]).arg("setpriv");
        }
        c.args(["--pdeathsig", "KILL", "--", program]).args(args);
        let mut g = Guard::spawn_logged(c, &format!("{what} ({program})"), log)?;
        g.what = what.to_string();
        Ok(g)
    }

    /// Starts `c` with stdout and stderr to `log`, in its own process group.
    pub fn spawn_logged(mut c: Command, what: &str, log: &Path) -> Result<Guard> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = c
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Guard {
            child,
            what: what.to_string(),
            group: true,
            grace: None,
        })
    }

    /// Starts `c` with no input and its output discarded (a server whose log is not
    /// read), guarded as [`Guard::adopt`] does.
    pub fn spawn_quiet(mut c: Command, what: &str) -> Result<Guard> {
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Guard::adopt(what, child))
    }

    /// Guards a child started elsewhere (killed by PID, through its handle).
    pub fn adopt(what: &str, child: Child) -> Guard {
        Guard {
            child,
            what: what.to_string(),
            group: false,
            grace: None,
        }
    }

    /// On drop, SIGTERM and up to `grace` to exit before the SIGKILL.
    pub fn term_first(mut self, grace: Duration) -> Guard {
        self.grace = Some(grace);
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM (to the process only) and waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if started.elapsed() > limit {
                bail!(
                    "{} (pid {pid}) did not exit within {} s of SIGTERM",
                    self.what,
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) for `needle` in `log`; returns the rest of that line after it.
    pub fn wait_for_log(&mut self, log: &Path, needle: &str, limit: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                let at = line.find(needle).expect("found") + needle.len();
                return Ok(line[at..].trim().to_string());
            }
            if let Some(s) = self.child.try_wait()? {
                bail!(
                    "{} exited ({s}) before logging {needle:?}; see {}",
                    self.what,
                    log.display()
                );
            }
            if started.elapsed() > limit {
                bail!(
                    "{} did not log {needle:?} within {} s; see {}",
                    self.what,
                    limit.as_secs(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(grace) = self.grace {
            if self.exited().is_none() {
                let _ = self.terminate(grace);
            }
        }
        if self.group {
            // The group first (its id is the child's PID, which stays taken while the
            // child is unreaped or any member lives), then the child itself.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.pid())])
                .stderr(Stdio::null())
                .status();
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` runs: its /proc entry is gone once reaped, and a killed
    /// grandchild may linger as a zombie (state Z) until init reaps it.
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| !r.starts_with('Z')))
            .unwrap_or(false)
    }

    #[test]
    fn a_dropped_guard_kills_its_whole_group_and_reaps() {
        let dir = std::env::temp_dir().join(format!("xtask-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("sh.log");
        // A shell that starts a grandchild in its group, says so, and waits.
        let mut g = Guard::spawn(
            "test shell",
            "sh",
            &["-c", "sleep 60 & echo ready $!; wait"],
            &log,
        )
        .unwrap();
        let grandchild: u32 = g
            .wait_for_log(&log, "ready", Duration::from_secs(10))
            .unwrap()
            .parse()
            .unwrap();
        let pid = g.pid();
        assert!(alive(pid) && alive(grandchild));
        drop(g);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "the child is reaped");
        assert!(!alive(grandchild), "its group is killed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn term_first_lets_a_server_stop_itself() {
        let dir = std::env::temp_dir().join(format!("xtask-proc-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("stopped");
        let script = format!(
            "trap 'touch {}; exit 0' TERM; while :; do sleep 0.05; done",
            marker.display()
        );
        let child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
        let g = Guard::adopt("trapping shell", child).term_first(Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(200));
        drop(g);
        assert!(marker.exists(), "SIGTERM came before SIGKILL");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
