//! Several hosts, simulated on this machine: three network namespaces, each
//! with its own address on a rate-limited link (`tests/cluster/hosts.sh`),
//! and one DDP worker per "host", started the way a multi-node job is (one
//! `bonfire launch --nnodes 3 --node-rank I` per host), meeting at host 0's
//! address, not at loopback; and, with the `mpi` feature, one MPI rank per
//! host started by one `mpirun` whose remote shell enters the namespaces,
//! with `--comm mpi`; and PyTorch's `torchrun` on two of the hosts, whose
//! agents share host 0's store with the workers. Each job must end with the
//! weights of one worker on the whole batch. It needs root (`ip netns`), as
//! CI has.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HOSTS: usize = 3;

mod common;

use bonfire_testkit::text;
use common::assert_like_one_worker;

fn script() -> PathBuf {
    // At run time: a build folder shared by two clones may run this test
    // compiled in the other one.
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../tests/cluster/hosts.sh")
}

/// The simulated hosts; dropping them removes the namespaces.
struct Hosts {
    name: String,
    subnet: u8,
}

impl Hosts {
    /// Test `test` of this run gets its own names and addresses.
    fn up(test: u32, rate: &str) -> Hosts {
        // Short names (interface names are at most 15 bytes), distinct per run.
        let pid = std::process::id();
        let hosts = Hosts { name: format!("bf{test}c{}", pid % 10_000), subnet: (100 + test * 60 + pid % 50) as u8 };
        let o = Command::new("bash")
            .arg(script())
            .args(["up", &hosts.name, &HOSTS.to_string(), &hosts.subnet.to_string(), rate])
            .output()
            .expect("bash");
        assert!(o.status.success(), "making the hosts (needs root and iproute2): {}", text(&o));
        hosts
    }

    fn address(&self, host: usize) -> String {
        format!("10.{}.0.{}", self.subnet, host + 1)
    }

    /// `args` run on host `host`, with `env` set.
    fn command(&self, host: usize, env: &[(&str, &str)], args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(script()).args(["exec", &self.name, &host.to_string(), "env"]);
        cmd.args(env.iter().map(|(k, v)| format!("{k}={v}"))).args(args);
        cmd
    }
}

/// Runs one command per host at once; each must succeed.
fn run_all(commands: Vec<Command>) -> Vec<Output> {
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut c| c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap())
        .collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (host, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "host {host}: {}", text(o));
    }
    outputs
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).args(["down", &self.name, &HOSTS.to_string()]).output();
    }
}

#[test]
fn a_ddp_job_over_three_hosts_equals_one_worker() {
    let hosts = Hosts::up(0, "1gbit");
    let dir = std::env::temp_dir().join(format!("bonfire-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bonfire = env!("CARGO_BIN_EXE_bonfire");
    let weights = dir.join("ddp.safetensors");
    let common = ["--steps", "20", "--batch-size", "48", "--no-shuffle"];
    let master = hosts.address(0);
    let nodes = HOSTS.to_string();
    let workers: Vec<_> = (0..HOSTS)
        .map(|host| {
            let out = dir.join(format!("out{host}"));
            let rank = host.to_string();
            let launch = [
                bonfire,
                "launch",
                "--nnodes",
                &nodes,
                "--node-rank",
                &rank,
                "--nproc-per-node",
                "1",
                "--master-addr",
                &master,
                "--master-port",
                "29400",
                "--",
                bonfire,
                "train",
                "--out",
                out.to_str().unwrap(),
                "--save",
                weights.to_str().unwrap(),
            ];
            hosts.command(host, &[("BONFIRE_JOB_TOKEN", "cluster-test")], &[&launch[..], &common].concat())
        })
        .collect();
    let outputs = run_all(workers);
    assert_eq!(text(&outputs[0]).matches("epoch 1:").count(), 1, "rank 0 reports: {}", text(&outputs[0]));
    assert_like_one_worker("the job over three hosts", &dir, &weights, &common);
}

/// `mpirun` on host 0 starts one rank on each host through the namespaces
/// (Open MPI's TCP transport between them, as between nodes).
#[cfg(feature = "mpi")]
#[test]
fn ddp_over_mpi_across_three_hosts_equals_one_worker() {
    let hosts = Hosts::up(1, "1gbit");
    let dir = std::env::temp_dir().join(format!("bonfire-cluster-mpi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hostfile = dir.join("hosts");
    let lines: String = (0..HOSTS).map(|h| format!("{}-h{h} slots=1\n", hosts.name)).collect();
    std::fs::write(&hostfile, lines).unwrap();
    let weights = dir.join("ddp.safetensors");
    let common = ["--steps", "20", "--batch-size", "48", "--no-shuffle"];
    let agent = format!("bash {} rsh", script().display());
    let out = dir.join("out");
    let mpirun = [
        "mpirun",
        "--hostfile",
        hostfile.to_str().unwrap(),
        "--mca",
        "plm_rsh_agent",
        &agent,
        "--mca",
        "btl_tcp_if_include",
        "eth0",
        "--mca",
        "oob_tcp_if_include",
        "eth0",
        // The hosts share this machine's cores: wait without spinning.
        "--mca",
        "mpi_yield_when_idle",
        "1",
        "-x",
        "OMPI_ALLOW_RUN_AS_ROOT",
        "-x",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        "-np",
        "3",
        env!("CARGO_BIN_EXE_bonfire"),
        "train",
        "--comm",
        "mpi",
        "--out",
        out.to_str().unwrap(),
        "--save",
        weights.to_str().unwrap(),
    ];
    // Containers and CI run as root, which mpirun refuses unless told.
    let root = [("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")];
    let o = hosts.command(0, &root, &[&mpirun[..], &common].concat()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("epoch 1:").count(), 1, "one report: {}", text(&o));
    assert_like_one_worker("the MPI job over three hosts", &dir, &weights, &common);
}

/// `torchrun --nnodes 2` on hosts 0 and 1, meeting at host 0's address
/// (c10d rendezvous): the workers join the store torchrun's agent hosts
/// there and form the ring across the hosts. Needs a Python with torch
/// (`BONFIRE_TORCH_PYTHON`), and says in the test output when there is none.
#[test]
fn torchrun_over_two_hosts_equals_one_worker() {
    let Some(python) = bonfire_testkit::torch_python("torchrun_over_two_hosts_equals_one_worker") else { return };
    let hosts = Hosts::up(2, "1gbit");
    let dir = std::env::temp_dir().join(format!("bonfire-cluster-torchrun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bonfire = env!("CARGO_BIN_EXE_bonfire");
    let weights = dir.join("ddp.safetensors");
    let common = ["--steps", "20", "--batch-size", "48", "--no-shuffle"];
    let endpoint = format!("{}:29400", hosts.address(0));
    let workers: Vec<_> = (0..2)
        .map(|host| {
            let out = dir.join(format!("out{host}"));
            let address = hosts.address(host);
            let torchrun = [
                python.as_str(),
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                &endpoint,
                "--rdzv-id",
                "cluster-test",
                // torchrun knows a host by its name, which every simulated
                // host shares: each is told its address, and host 0 that
                // it hosts the rendezvous.
                "--local-addr",
                &address,
                "--rdzv-conf",
                if host == 0 { "is_host=1,join_timeout=120" } else { "is_host=0,join_timeout=120" },
                "--no-python",
                bonfire,
                "train",
                "--strategy",
                "ddp",
                "--out",
                out.to_str().unwrap(),
                "--save",
                weights.to_str().unwrap(),
            ];
            hosts.command(host, &[], &[&torchrun[..], &common].concat())
        })
        .collect();
    run_all(workers);
    assert_like_one_worker("torchrun over two hosts", &dir, &weights, &common);
}
