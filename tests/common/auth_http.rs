//! An HTTP service speaking nginx's `auth_http` protocol
//! (tests/python/auth_http_server.py), run as a child process, and what it
//! was asked.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The auth service, as a child process; killed when dropped.
pub struct AuthService {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
}

impl AuthService {
    pub fn start(name: &str, config: &serde_json::Value) -> AuthService {
        let dir = std::env::temp_dir().join(format!(
            "postern-test-authhttp-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("config.json"), config.to_string()).unwrap();
        fs::write(dir.join("secret"), "s3cret-key\n").unwrap();
        let mut service = AuthService {
            child: None,
            dir,
            port: 0,
        };
        service.spawn();
        service
    }

    pub fn spawn(&mut self) {
        let _ = fs::remove_file(self.dir.join("port"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/auth_http_server.py"
        );
        let child = Command::new("python3")
            .arg(script)
            .arg(self.dir.join("config.json"))
            .arg(self.dir.join("port"))
            .arg(self.dir.join("requests.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 runs");
        self.child = Some(child);
        let mut port = 0;
        super::wait_until("the auth service's port", super::SETTLE, || {
            port = fs::read_to_string(self.dir.join("port"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            port != 0
        });
        self.port = port;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every request's headers, in order.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["headers"].clone())
            .collect()
    }

    pub fn auth_source(&self, timeout: &str) -> String {
        format!(
            "  source: http\n  http:\n    url: \"http://127.0.0.1:{}/auth?from=postern\"\n    timeout: {timeout}\n    headers: {{ X-Deployment: test }}\n    header_files: {{ X-Auth-Key: {} }}\n  cache_ttl: 0s\n",
            self.port,
            self.dir.join("secret").display()
        )
    }
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
