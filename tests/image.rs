//! The container image. hadolint passes the Dockerfile; scripts/container-image
//! builds it with buildah (vfs storage, chroot isolation, --pull-never) from
//! base images made on this machine; inside it `postern --version` runs and
//! the shipped configuration passes `check-config`; the image runs as 65532,
//! exposes only unprivileged ports, has no HEALTHCHECK and no shell. Then
//! the image is started the way a container runtime starts it (its own PID
//! and network namespaces, uid 65532, the image's root read-only with a
//! tmpfs on /tmp): Postern is PID 1, becomes ready, and exits 0 on SIGTERM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

mod common;

const IMAGE: &str = "localhost/postern:test";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} is missing ({e}): scripts/test installs it"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn buildah(args: &[&str]) -> String {
    let mut all = vec!["--storage-driver", "vfs"];
    all.extend_from_slice(args);
    ok("buildah", &all)
}

/// Builds the image once for every test in this file.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = output("scripts/container-image", &[IMAGE]);
        assert!(
            out.status.success(),
            "scripts/container-image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), IMAGE);
    });
    IMAGE
}

/// A working container of the image, removed when dropped.
struct Container {
    name: String,
}

impl Container {
    fn new() -> Container {
        let name = buildah(&["from", "--pull-never", image()])
            .trim()
            .to_owned();
        Container { name }
    }

    fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["run", "--isolation", "chroot", &self.name, "--"];
        all.extend_from_slice(args);
        buildah(&all)
    }

    fn mount(&self) -> PathBuf {
        PathBuf::from(buildah(&["mount", &self.name]).trim())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = output("buildah", &["--storage-driver", "vfs", "rm", &self.name]);
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = ok("hadolint", &["Dockerfile"]);
    assert!(out.trim().is_empty(), "{out}");
}

#[test]
fn image_runs_postern_and_checks_its_shipped_configuration() {
    let c = Container::new();
    let version = c.run(&["/usr/local/bin/postern", "--version"]);
    assert_eq!(
        version.trim(),
        format!("postern {}", env!("CARGO_PKG_VERSION"))
    );
    let checked = c.run(&[
        "/usr/local/bin/postern",
        "check-config",
        "/etc/postern/postern.yaml",
    ]);
    assert!(checked.contains("configuration OK"), "{checked}");
    // The same file as in the repository.
    let rootfs = c.mount();
    assert_eq!(
        fs::read(rootfs.join("etc/postern/postern.yaml")).unwrap(),
        fs::read(root().join("deploy/container/postern.yaml")).unwrap()
    );
    // Nothing to exec into but Postern: no shell, no package manager.
    for absent in ["bin/sh", "bin/bash", "usr/bin/apt-get", "usr/bin/dpkg"] {
        assert!(!rootfs.join(absent).exists(), "{absent} is in the image");
    }
}

#[test]
fn image_config_is_non_root_unprivileged_and_without_healthcheck() {
    let inspect: serde_json::Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", image()])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/postern"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/postern/postern.yaml"])
    );
    let ports: Vec<u16> = config["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    let mut sorted = ports.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [9090, 9110, 9143, 9993, 9995], "{ports:?}");
    assert!(ports.iter().all(|&p| p >= 1024), "{ports:?}");
    assert!(inspect["Docker"]["config"]["Healthcheck"].is_null());
    // Small: the binary and glibc, not a distribution.
    let size = buildah(&["images", "--format", "{{.Size}}", image()]);
    eprintln!("image size: {}", size.trim());
    let layers = inspect["OCIv1"]["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .len();
    assert!(layers <= 4, "{layers} layers");
}

/// Started as a container runtime would, Postern is PID 1 of its own PID
/// namespace, runs as 65532 on a read-only root, answers /readyz, writes
/// its self-signed certificate only to the tmpfs, and leaves on SIGTERM
/// with exit status 0.
#[test]
fn postern_is_pid_1_on_a_read_only_root_and_exits_0_on_sigterm() {
    let c = Container::new();
    let rootfs = c.mount();
    // A runtime's mount points; the image itself has no /proc or /tmp content.
    for dir in ["proc", "tmp", "dev"] {
        fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    let script = "set -e
root=$1
mount --bind \"$root\" \"$root\"
mount -o remount,bind,ro \"$root\"
mount -t tmpfs -o mode=1777,size=16m tmpfs \"$root/tmp\"
mount -t proc proc \"$root/proc\"
ip link set lo up
exec chroot --userspec=65532:65532 \"$root\" /usr/local/bin/postern run --config /etc/postern/postern.yaml";
    let log = std::env::temp_dir().join(format!("postern-image-pid1-{}.log", std::process::id()));
    let log_file = fs::File::create(&log).unwrap();
    let mut unshare = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--net",
            "--mount",
            "--kill-child",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&rootfs)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("unshare (util-linux) runs");
    let children = format!("/proc/{0}/task/{0}/children", unshare.id());
    let mut pid = String::new();
    common::wait_until("the container's first process", common::SETTLE, || {
        pid = fs::read_to_string(&children)
            .unwrap_or_default()
            .trim()
            .to_owned();
        !pid.is_empty()
            && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postern")
    });
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        field("NSpid:").last().unwrap(),
        "1",
        "PID 1 in its namespace"
    );
    assert_eq!(field("Uid:"), vec!["65532"; 4]);

    let readyz = || {
        let out = output(
            "nsenter",
            &[
                "-t",
                &pid,
                "-n",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:9090/readyz",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    common::wait_until("/readyz answers 200", common::SETTLE, || readyz() == "200");
    let in_container = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(in_container.join("tmp/postern-tls/cert.pem").exists());
    let err = fs::write(in_container.join("etc/postern/probe"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(30),
        "EROFS, the root is read-only: {err}"
    );

    ok("kill", &["-TERM", &pid]);
    let mut exit = None;
    common::wait_until("Postern exits after SIGTERM", common::SETTLE, || {
        exit = unshare.try_wait().unwrap();
        exit.is_some()
    });
    let text = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    assert!(exit.unwrap().success(), "exit {exit:?}; log:\n{text}");
    assert!(text.contains("\"message\":\"shut down\""), "{text}");
}
