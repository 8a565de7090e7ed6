//! A real single-node Kubernetes on this machine, where Pods run.
//!
//! containerd, runc and the CNI plugins come from Debian's packages (`make deps`); the API
//! server, controller-manager, scheduler, kube-proxy and kubelet from the multi-call
//! `eden-control-plane` (`e2e/control-plane/`); cluster DNS from CoreDNS (`e2e/coredns/`). The
//! node's own images (the pod sandbox's pause, CoreDNS, and a tools image with busybox,
//! `redis-server` and `redis-cli` for test pods) are packed by `images/build.py` and imported into
//! containerd: nothing is ever pulled. Configuration is in `e2e/node/`.
//!
//! A node changes host-wide state (the `cni0` bridge, iptables chains, the kubelet's and
//! kube-proxy's ports 10248–10259, a few sysctls, cgroups), so there is one per machine. The
//! `eden-node` program ([`serve`]) holds a lock while it brings the node up, serves until its
//! standard input closes, then tears it down by PID and removes what it made, restoring the
//! sysctls it found; a run that died half-way is cleaned up by the next one (or `eden-node
//! down`). Test binaries share one ([`Node::shared`]) and isolate themselves by namespace.
//!
//! The node listens only on the pod network's gateway address and loopback: the API server and
//! the kubelet are reachable from pods and from this machine, nowhere else.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::{Cluster, ControlPlane, FixtureError, eventually};

/// The node's name.
pub const NODE_NAME: &str = "eden-node";
/// Busybox (`busybox sh`, `busybox sleep`), `redis-server` and `redis-cli`, for test pods.
pub const TOOLS_IMAGE: &str = "localhost/eden-node/tools:1";
const PAUSE_IMAGE: &str = "localhost/eden-node/pause:1";
const COREDNS_IMAGE: &str = "localhost/eden-node/coredns:1";
/// The pod network's bridge and its gateway, which is also the node's address.
const BRIDGE: &str = "cni0";
const ADDRESS: &str = "10.88.0.1";
const POD_NETWORK_PREFIX: u8 = 16;
/// Host settings the node changes (IP forwarding, bridged traffic through iptables) or the
/// kubelet does at start: recorded before and put back after.
const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// What the node runs besides the control plane, stopped in this order.
const COMPONENTS: &[&str] = &["kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "containerd"];

/// The running node, as tests see it: a [`Cluster`] whose Pods run, and containerd to import
/// images into.
#[derive(Debug)]
pub struct Node {
    cluster: Cluster,
    socket: PathBuf,
    _keeper: Child,
    // Held open: the node is torn down when this pipe closes (when the test binary exits).
    _stdin: ChildStdin,
}

impl Node {
    /// The node every test of this process shares, brought up on first use (about 15 s warm,
    /// after waiting for any other process's node to be torn down).
    ///
    /// # Panics
    /// When the node cannot come up: no test that needs it can run.
    pub fn shared() -> &'static Node {
        static SHARED: OnceLock<Node> = OnceLock::new();
        SHARED.get_or_init(|| Node::start().unwrap_or_else(|err| panic!("{err}")))
    }

    fn start() -> Result<Node, FixtureError> {
        let mut keeper = Command::new(crate::workspace_binary("e2e", "eden-node")?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = keeper.stdin.take().expect("stdin is piped");
        let stdout = keeper.stdout.take().expect("stdout is piped");
        let stderr = keeper.stderr.take().expect("stderr is piped");
        // The keeper's progress, kept for the error when it fails.
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("not poisoned").push(line);
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((kubeconfig, socket)) = line.strip_prefix("ready ").and_then(|rest| rest.split_once(' ')) {
                    let _ = ready_tx.send((PathBuf::from(kubeconfig), PathBuf::from(socket)));
                }
            }
        });
        // No timeout: the keeper either prints its ready line or exits (closing stdout).
        match ready_rx.recv() {
            Ok((kubeconfig, socket)) => {
                Ok(Node { cluster: Cluster::new(kubeconfig), socket, _keeper: keeper, _stdin: stdin })
            }
            Err(_) => {
                let _ = keeper.wait();
                Err(FixtureError::NotReady {
                    what: "the node".into(),
                    detail: log.lock().expect("not poisoned").join("\n"),
                })
            }
        }
    }

    /// Imports an OCI archive (`images/build.py`'s) into the node's containerd, under the name
    /// the archive gives it.
    pub fn import_image(&self, archive: &Path) -> Result<(), FixtureError> {
        import_image(&self.socket, archive)
    }

    /// Kills a container with SIGKILL through containerd, as a crash would: `id` is the
    /// `containerID` a pod's status gives (`containerd://<id>`). Its pod's restart policy decides
    /// what the kubelet does next.
    pub fn kill_container(&self, id: &str) -> Result<(), FixtureError> {
        let id = id.strip_prefix("containerd://").unwrap_or(id);
        let mut command = Command::new("ctr");
        command.arg("--address").arg(&self.socket).args(["-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id]);
        crate::stdout_of(&mut command, None).map(drop)
    }
}

impl std::ops::Deref for Node {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

/// The node's directory: fixed, so that a run finds what an earlier one left behind.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("eden-node")
}

/// Brings the node up in `dir`, prints `ready <kubeconfig> <containerd socket>` on stdout, serves
/// until stdin closes, then tears it down. Progress and timings go to stderr.
pub fn serve(dir: &Path) -> Result<(), FixtureError> {
    let lock = File::create(dir.with_extension("lock"))?;
    lock.lock()?;
    teardown(dir, None);
    let started = Instant::now();
    let result = bring_up(dir, started).map(|control_plane| {
        println!("ready {} {}", control_plane.kubeconfig().display(), socket(dir).display());
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        progress(started, "stdin closed: tearing down");
        teardown(dir, Some(&control_plane));
        progress(started, "torn down");
    });
    if result.is_err() {
        // Whatever came up before the failure goes too.
        teardown(dir, None);
    }
    result
}

/// Removes what a node left in `dir`: its processes (by PID), pods' containers, iptables chains,
/// the bridge, mounts and cgroups, then puts back the sysctls it found. Harmless when there is
/// nothing to remove; `cluster` is the node's API server when it still runs, so that pods are
/// deleted through the kubelet first.
pub fn teardown(dir: &Path, cluster: Option<&Cluster>) {
    stop(dir, "kube-controller-manager");
    stop(dir, "kube-scheduler");
    if let Some(cluster) = cluster.filter(|_| running(dir, "kubelet").is_some()) {
        // The kubelet stops each pod's containers and tears its network down through CNI.
        let _ =
            cluster.run_kubectl(&["delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--timeout=60s"]);
    }
    for component in COMPONENTS {
        if *component == "containerd" && running(dir, "containerd").is_some() {
            remove_containers(dir);
        }
        stop(dir, component);
    }
    // Shims outlive containerd; theirs name its socket.
    kill_matching(&socket(dir).display().to_string());
    remove_iptables_chains();
    let _ = run("ip", &["link", "delete", BRIDGE]);
    unmount_under(dir);
    remove_cgroups();
    restore_sysctls(dir);
    let _ = std::fs::remove_dir_all(dir);
}

fn bring_up(dir: &Path, started: Instant) -> Result<ControlPlane, FixtureError> {
    for sub in ["pids", "logs", "run", "cni", "images"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    record_sysctls(dir)?;
    set_sysctl("net/ipv4/ip_forward", "1")?;
    set_sysctl("net/bridge/bridge-nf-call-iptables", "1")?;
    // The bridge exists before any pod, so the API server and the kubelet can listen on its
    // address; the CNI bridge plugin takes it as it finds it.
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run("ip", &["addr", "add", &format!("{ADDRESS}/{POD_NETWORK_PREFIX}"), "dev", BRIDGE])?;
    run("ip", &["link", "set", BRIDGE, "up"])?;

    let images = node_images(dir)?;
    progress(started, "images packed");
    write_config(dir, "containerd.toml", "containerd.toml", &[])?;
    write_config(dir, "cni.conflist", "cni/10-eden-node.conflist", &[])?;
    spawn(dir, "containerd", Path::new("containerd"), &["--config".as_ref(), dir.join("containerd.toml").as_os_str()])?;
    eventually("containerd's socket", Duration::from_secs(30), || socket(dir).exists().then_some(()))?;
    for archive in &images {
        import_image(&socket(dir), archive)?;
    }
    progress(started, "containerd up, images imported");

    let control_plane = ControlPlane::start_for_node(ADDRESS)?;
    progress(started, "API server ready");
    let kubeconfig = control_plane.kubeconfig().to_path_buf();
    let pki = kubeconfig.parent().expect("the kubeconfig is in the control plane's directory").join("pki");
    let binary = ControlPlane::binary()?;
    let flag = |name: &str, path: &Path| format!("--{name}={}", path.display());
    let kubeconfig_flags =
        ["kubeconfig", "authentication-kubeconfig", "authorization-kubeconfig"].map(|f| flag(f, &kubeconfig));
    let mut controller_manager = vec!["kube-controller-manager".to_string()];
    controller_manager.extend(kubeconfig_flags.iter().cloned());
    controller_manager.extend([
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
        "--use-service-account-credentials=false".into(),
        flag("root-ca-file", &pki.join("ca.crt")),
        flag("service-account-private-key-file", &pki.join("service-account.key")),
    ]);
    let mut scheduler = vec!["kube-scheduler".to_string()];
    scheduler.extend(kubeconfig_flags.iter().cloned());
    scheduler.extend(["--bind-address=127.0.0.1".into(), "--leader-elect=false".into()]);
    write_config(dir, "kube-proxy.yaml", "kube-proxy.yaml", &[("@KUBECONFIG@", &kubeconfig.display().to_string())])?;
    let proxy = ["kube-proxy".to_string(), flag("config", &dir.join("kube-proxy.yaml"))];
    write_config(dir, "kubelet.yaml", "kubelet.yaml", &[])?;
    let kubelet = [
        "kubelet".to_string(),
        flag("config", &dir.join("kubelet.yaml")),
        flag("kubeconfig", &kubeconfig),
        flag("root-dir", &dir.join("kubelet")),
        flag("cert-dir", &dir.join("kubelet/pki")),
        format!("--hostname-override={NODE_NAME}"),
        format!("--node-ip={ADDRESS}"),
    ];
    for args in [&controller_manager[..], &scheduler[..], &proxy[..], &kubelet[..]] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|arg| arg.as_ref()).collect();
        spawn(dir, args[0].to_str().expect("component names are UTF-8"), &binary, &args)?;
    }

    let node = format!("node/{NODE_NAME}");
    let registered = eventually("the node's registration", Duration::from_secs(60), || {
        match control_plane.run_kubectl(&["get", &node]) {
            Ok(_) => Some(Ok(())),
            Err(_) => exited_component(dir).map(Err),
        }
    })?;
    registered.map_err(|detail| FixtureError::NotReady { what: "the node".into(), detail })?;
    control_plane.run_kubectl(&["wait", "--for=condition=Ready", &node, "--timeout=120s"])?;
    progress(started, "node Ready");
    // The controller-manager makes each namespace's default ServiceAccount, which pods need.
    eventually("the default ServiceAccount", Duration::from_secs(60), || {
        control_plane.run_kubectl(&["get", "serviceaccount", "default"]).ok()
    })?;
    let coredns = std::fs::read_to_string(crate::repo_root().join("e2e/node/coredns.yaml"))?;
    control_plane.apply_manifest("kube-system", &coredns.replace("@IMAGE@", COREDNS_IMAGE))?;
    control_plane.run_kubectl(&["-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=120s"])?;
    progress(started, "cluster DNS ready");
    Ok(control_plane)
}

/// The log of the first component that has exited, if one has.
fn exited_component(dir: &Path) -> Option<String> {
    let exited = COMPONENTS.iter().find(|component| running(dir, component).is_none())?;
    let log = std::fs::read_to_string(dir.join("logs").join(format!("{exited}.log"))).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    Some(format!("{exited} exited:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")))
}

/// A line on stderr, which may be closed by now: a test binary that exits closes the keeper's
/// pipes with its stdin, and the teardown must go on.
fn progress(started: Instant, what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "eden-node [{:5.1}s] {what}", started.elapsed().as_secs_f64());
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("run/containerd.sock")
}

/// `e2e/node/<name>` with `@STATE@` (the node's directory), `@ADDRESS@` and `extra` filled in,
/// written to `dir/<to>`.
fn write_config(dir: &Path, name: &str, to: &str, extra: &[(&str, &str)]) -> Result<(), FixtureError> {
    let mut text = std::fs::read_to_string(crate::repo_root().join("e2e/node").join(name))?;
    let state = dir.display().to_string();
    for (placeholder, value) in [("@STATE@", state.as_str()), ("@ADDRESS@", ADDRESS)].iter().chain(extra) {
        text = text.replace(placeholder, value);
    }
    Ok(std::fs::write(dir.join(to), text)?)
}

/// The node's own images as OCI archives: pause (compiled here, static), CoreDNS and tools.
fn node_images(dir: &Path) -> Result<Vec<PathBuf>, FixtureError> {
    let images = dir.join("images");
    let pause = images.join("pause");
    let source = crate::repo_root().join("e2e/node/pause.c");
    run_os("cc", &["-Os".as_ref(), "-static".as_ref(), "-o".as_ref(), pause.as_os_str(), source.as_os_str()])?;
    let coredns = crate::go_program("EDEN_COREDNS", "e2e/coredns/build.sh")?;
    let redis_server = which("redis-server")?;
    let tools = [which("busybox")?, which("redis-cli")?, redis_server];
    let mut archives = Vec::new();
    for (name, binaries) in [(PAUSE_IMAGE, &[pause][..]), (COREDNS_IMAGE, &[coredns][..]), (TOOLS_IMAGE, &tools[..])] {
        let mut command = Command::new("python3");
        command.arg(crate::repo_root().join("images/build.py")).arg("--out").arg(&images).args(["--name", name]);
        let printed = crate::stdout_of(command.args(binaries), None)?;
        archives.push(PathBuf::from(printed.split_whitespace().next().unwrap_or_default()));
    }
    Ok(archives)
}

fn which(program: &'static str) -> Result<PathBuf, FixtureError> {
    let found = crate::stdout_of(Command::new("sh").args(["-c", &format!("command -v {program}")]), None);
    found
        .map(|path| PathBuf::from(path.trim()))
        .map_err(|_| FixtureError::Missing { program, hint: "`make deps` installs it from Debian's packages" })
}

fn import_image(socket: &Path, archive: &Path) -> Result<(), FixtureError> {
    let mut command = Command::new("ctr");
    command.arg("--address").arg(socket).args(["-n", "k8s.io", "images", "import"]).arg(archive);
    crate::stdout_of(&mut command, None).map(drop)
}

fn run(program: &str, args: &[&str]) -> Result<String, FixtureError> {
    run_os(program, &args.iter().map(|arg| arg.as_ref()).collect::<Vec<_>>())
}

fn run_os(program: &str, args: &[&std::ffi::OsStr]) -> Result<String, FixtureError> {
    crate::stdout_of(Command::new(program).args(args), None)
}

/// Starts `program` as component `name`, in its own process group (a terminal's Ctrl-C reaches
/// the keeper only), logging to `logs/<name>.log`, its PID in `pids/<name>.pid`.
fn spawn(dir: &Path, name: &str, program: &Path, args: &[&std::ffi::OsStr]) -> Result<(), FixtureError> {
    use std::os::unix::process::CommandExt;
    let log = File::create(dir.join("logs").join(format!("{name}.log")))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    Ok(std::fs::write(dir.join("pids").join(format!("{name}.pid")), child.id().to_string())?)
}

/// The PID of component `name` when its process still runs (not a zombie) and is the one
/// started: its command line names the component.
fn running(dir: &Path, name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("pids").join(format!("{name}.pid"))).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid).filter(|pid| command_line(*pid).is_some_and(|line| line.contains(name)))
}

fn alive(pid: u32) -> bool {
    // The state is the field after the command's name in parentheses; Z is a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Stops component `name`: SIGTERM, then SIGKILL after 10 s.
fn stop(dir: &Path, name: &str) {
    if let Some(pid) = running(dir, name) {
        terminate(pid);
    }
    let _ = std::fs::remove_file(dir.join("pids").join(format!("{name}.pid")));
}

fn terminate(pid: u32) {
    let pid_arg = pid.to_string();
    let _ = run("kill", &["-TERM", &pid_arg]);
    if eventually("exit", Duration::from_secs(10), || (!alive(pid)).then_some(())).is_err() {
        let _ = run("kill", &["-KILL", &pid_arg]);
    }
}

/// Stops every process whose command line contains `needle` (the node's directory makes it
/// unique to the node).
fn kill_matching(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    let pids = entries.flatten().filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids.filter(|pid| command_line(*pid).is_some_and(|line| line.contains(needle))) {
        terminate(pid);
    }
}

/// Kills and removes every container containerd still has (the pods' processes, sandboxes).
fn remove_containers(dir: &Path) {
    let ctr = |args: &[&str]| {
        let mut command = Command::new("ctr");
        command.arg("--address").arg(socket(dir)).args(["-n", "k8s.io"]).args(args);
        crate::stdout_of(&mut command, None).unwrap_or_default()
    };
    for task in ctr(&["tasks", "list", "-q"]).lines() {
        ctr(&["tasks", "kill", "-s", "SIGKILL", task]);
    }
    let _ = eventually("containers' tasks to stop", Duration::from_secs(10), || {
        ctr(&["tasks", "list"]).lines().skip(1).all(|line| line.contains("STOPPED")).then_some(())
    });
    for task in ctr(&["tasks", "list", "-q"]).lines() {
        ctr(&["tasks", "delete", "-f", task]);
    }
    for container in ctr(&["containers", "list", "-q"]).lines() {
        ctr(&["containers", "delete", container]);
    }
}

/// Removes the chains the kubelet, kube-proxy and the CNI plugins made (`KUBE-*`, `CNI-*`) and
/// every rule that jumps to them, table by table, by restoring the table without them.
fn remove_iptables_chains() {
    for (save, restore) in [("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")] {
        for table in ["filter", "nat", "mangle", "raw"] {
            let Ok(rules) = run(save, &["-t", table]) else { continue };
            let ours = |line: &&str| line.contains("KUBE-") || line.contains("CNI-");
            if !rules.lines().any(|line| ours(&line)) {
                continue;
            }
            let kept: String = rules.lines().filter(|line| !ours(line)).map(|line| format!("{line}\n")).collect();
            let _ = crate::stdout_of(Command::new(restore).args(["-T", table]), Some(&kept));
        }
    }
}

/// Unmounts what the kubelet and containerd left mounted under `dir` (volumes, network
/// namespaces, container root filesystems), deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|point| point.replace("\\040", " "))
        .filter(|point| point.starts_with(&prefix))
        .collect();
    points.sort_by(|a, b| b.cmp(a));
    for point in points {
        let _ = run("umount", &["--lazy", &point]);
    }
}

/// Removes the pods' cgroups the kubelet made (`kubepods` under each cgroup v1 hierarchy),
/// deepest first; empty once the pods' processes are gone.
fn remove_cgroups() {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            entries.flatten().filter(|entry| entry.path().is_dir()).for_each(|entry| remove(&entry.path()));
        }
        let _ = std::fs::remove_dir(dir);
    }
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    for hierarchy in hierarchies.flatten() {
        remove(&hierarchy.path().join("kubepods"));
    }
}

fn set_sysctl(name: &str, value: &str) -> Result<(), FixtureError> {
    Ok(std::fs::write(Path::new("/proc/sys").join(name), value)?)
}

/// Records [`SYSCTLS`] in `dir/sysctls`, unless an earlier run's record (the host's own values)
/// is there.
fn record_sysctls(dir: &Path) -> Result<(), FixtureError> {
    let record = dir.join("sysctls");
    if record.exists() {
        return Ok(());
    }
    let mut lines = String::new();
    for name in SYSCTLS {
        let value = std::fs::read_to_string(Path::new("/proc/sys").join(name))?;
        lines.push_str(&format!("{name} {}\n", value.trim()));
    }
    Ok(std::fs::write(record, lines)?)
}

fn restore_sysctls(dir: &Path) {
    let Ok(record) = std::fs::read_to_string(dir.join("sysctls")) else { return };
    for (name, value) in record.lines().filter_map(|line| line.split_once(' ')) {
        let _ = set_sysctl(name, value);
    }
    let _ = std::fs::remove_file(dir.join("sysctls"));
}
