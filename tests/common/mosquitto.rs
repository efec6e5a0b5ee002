//! A real mosquitto for the external-broker tests and benchmarks: on a free loopback port, in
//! its default configuration plus whatever lines a test adds, restartable on the same port.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
}

fn executable() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto")
}

/// Whether mosquitto is installed (benchmarks skip their mosquitto parts without it).
pub fn installed() -> bool {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .any(|p| Path::new(p).exists())
}

impl Mosquitto {
    /// Starts mosquitto listening on 127.0.0.1 with its defaults and `extra` config lines
    /// (e.g. `max_queued_messages 0`, `persistence true`).
    pub fn start(dir: &Path, extra: &str) -> Mosquitto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Mosquitto::start_on(dir, port, extra)
    }

    /// The same on a given port (one a service was told to connect to before it was up).
    pub fn start_on(dir: &Path, port: u16, extra: &str) -> Mosquitto {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}\n"),
        )
        .unwrap();
        let mut m = Mosquitto {
            child: None,
            port,
            conf,
        };
        m.spawn();
        m
    }

    /// A mosquitto on a configuration file of its own, which listens on `port`.
    pub fn with_config(conf: &Path, port: u16) -> Mosquitto {
        let mut m = Mosquitto {
            child: None,
            port,
            conf: conf.to_owned(),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(executable())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it with SIGTERM (it saves its persistence file, if it has one) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Stops it and starts it again on the same port with the same configuration.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
