use super::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    DistEnv::from_lookup(|k| map.get(k).cloned())
}

/// Four workers over two hosts, which need a token.
const GOOD: [(&str, &str); 7] = [
    ("RANK", "1"),
    ("WORLD_SIZE", "4"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "2"),
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", "29500"),
    ("BONFIRE_JOB_TOKEN", "secret"),
];

fn without(var: &str) -> Vec<(&'static str, &'static str)> {
    GOOD.iter().copied().filter(|(k, _)| *k != var).collect()
}

fn with(var: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut v = without(var);
    v.push((var, value));
    v
}

#[test]
fn reads_the_torchrun_contract() {
    let e = env(&GOOD).unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (1, 4, 1, 2));
    assert_eq!(e.store_addr(), "127.0.0.1:29500");
}

#[test]
fn the_job_token_is_given_shared_on_one_host_or_required_across_hosts() {
    assert_eq!(env(&GOOD).unwrap().job_token, JobToken::Given("secret".into()));
    // Several hosts without a token: refused, saying how to give one or opt out.
    let err = env(&without("BONFIRE_JOB_TOKEN")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CommError::Env { var: "BONFIRE_JOB_TOKEN", .. }), "{text}");
    assert!(text.contains("several hosts") && text.contains("BONFIRE_INSECURE_RENDEZVOUS=1"), "{text}");
    assert!(env(&with("BONFIRE_JOB_TOKEN", "")).is_err(), "an empty token is no token");
    let mut open = without("BONFIRE_JOB_TOKEN");
    open.push(("BONFIRE_INSECURE_RENDEZVOUS", "1"));
    assert_eq!(env(&open).unwrap().job_token, JobToken::Open);
    let bad = with("BONFIRE_INSECURE_RENDEZVOUS", "yes");
    assert!(matches!(env(&bad), Ok(e) if e.job_token == JobToken::Given("secret".into())), "a given token wins");
    let mut bad = without("BONFIRE_JOB_TOKEN");
    bad.push(("BONFIRE_INSECURE_RENDEZVOUS", "yes"));
    assert!(matches!(env(&bad), Err(CommError::Env { var: "BONFIRE_INSECURE_RENDEZVOUS", .. })));
    // Every worker on this host: shared through a file.
    let mut one_host: Vec<_> =
        without("BONFIRE_JOB_TOKEN").into_iter().filter(|(k, _)| !k.starts_with("LOCAL")).collect();
    one_host.push(("LOCAL_WORLD_SIZE", "4"));
    assert_eq!(env(&one_host).unwrap().job_token, JobToken::HostFile);
    let long = "x".repeat(crate::store::MAX_TOKEN + 1);
    let err = DistEnv::from_lookup(|k| match k {
        "BONFIRE_JOB_TOKEN" => Some(long.clone()),
        _ => GOOD.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()),
    });
    assert!(matches!(err, Err(CommError::Env { var: "BONFIRE_JOB_TOKEN", .. })));
}

#[test]
fn local_variables_default_to_the_global_ones() {
    let pairs: Vec<_> = without("LOCAL_RANK").into_iter().filter(|(k, _)| *k != "LOCAL_WORLD_SIZE").collect();
    let e = env(&pairs).unwrap();
    assert_eq!((e.local_rank, e.local_world_size), (1, 4));
}

#[test]
fn every_missing_required_variable_is_named() {
    for var in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
        let err = env(&without(var)).unwrap_err().to_string();
        assert!(err.contains(var) && err.contains("not set"), "{var}: {err}");
    }
}

#[test]
fn every_invalid_variable_is_named() {
    let cases = [
        ("RANK", "one"),
        ("RANK", "4"),
        ("RANK", "-1"),
        ("WORLD_SIZE", "0"),
        ("WORLD_SIZE", "x"),
        ("LOCAL_RANK", "2"),
        ("LOCAL_WORLD_SIZE", "9"),
        ("MASTER_ADDR", " "),
        ("MASTER_PORT", "70000"),
        ("MASTER_PORT", "0"),
        ("MASTER_PORT", "http"),
    ];
    for (var, value) in cases {
        let err = env(&with(var, value)).unwrap_err();
        assert!(matches!(err, CommError::Env { var: v, .. } if v == var), "{var}={value}: {err}");
    }
}

#[test]
fn open_mpi_on_one_host_needs_no_torchrun_variable_but_a_port() {
    let ompi = [
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("MASTER_PORT", "29511"),
    ];
    let e = env(&ompi).unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (1, 2, 1, 2));
    assert_eq!(e.store_addr(), "127.0.0.1:29511");
    // Over several hosts rank 0's address must be given.
    let spread = [("OMPI_COMM_WORLD_LOCAL_SIZE", "1"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")];
    let pairs: Vec<_> = ompi.iter().copied().filter(|(k, _)| !k.contains("LOCAL")).chain(spread).collect();
    let err = env(&pairs).unwrap_err().to_string();
    assert!(err.contains("MASTER_ADDR") && err.contains("mpirun"), "{err}");
}

#[test]
fn pmi_is_read_as_mpich_sets_it() {
    let e = env(&[
        ("PMI_RANK", "2"),
        ("PMI_SIZE", "3"),
        ("MPI_LOCALRANKID", "2"),
        ("MPI_LOCALNRANKS", "3"),
        ("MASTER_PORT", "1234"),
    ])
    .unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (2, 3, 2, 3));
}

const SLURM: [(&str, &str); 8] = [
    ("BONFIRE_JOB_TOKEN", "secret"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_PROCID", "3"),
    ("SLURM_STEP_NUM_TASKS", "5"),
    ("SLURM_LOCALID", "0"),
    ("SLURM_NODEID", "1"),
    ("SLURM_STEP_TASKS_PER_NODE", "3,2"),
    ("SLURM_JOB_ID", "123456"),
];

#[test]
fn an_srun_step_finds_rank_0_on_its_first_node_and_a_port_from_its_job() {
    let mut pairs = SLURM.to_vec();
    pairs.push(("SLURM_STEP_NODELIST", "node[07-08]"));
    let e = env(&pairs).unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (3, 5, 0, 2));
    assert_eq!(e.store_addr(), format!("node07:{}", 20_000 + 123_456 % 20_000));
    // A batch script (no step) is not a worker.
    let batch: Vec<_> = pairs.iter().copied().filter(|(k, _)| *k != "SLURM_STEP_ID").collect();
    assert!(DistEnv::launched_by(|k| batch.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).is_none());
}

#[test]
fn torchruns_variables_win_over_the_others() {
    let mut pairs = GOOD.to_vec();
    pairs.extend([("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "8")]);
    pairs.extend(SLURM);
    let e = env(&pairs).unwrap();
    assert_eq!((e.rank, e.world_size), (1, 4));
}

#[test]
fn a_launchers_numbers_that_do_not_add_up_name_its_variables() {
    let err = env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
    assert!(
        err.to_string().contains("OMPI_COMM_WORLD_RANK") && err.to_string().contains("OMPI_COMM_WORLD_SIZE=2"),
        "{err}"
    );
    let err = env(&[("PMI_RANK", "0"), ("MASTER_PORT", "1")]).unwrap_err();
    assert!(matches!(err, CommError::Env { var: "PMI_SIZE", .. }), "{err}");
}

#[test]
fn slurm_host_lists_and_task_counts() {
    assert_eq!(first_host("node[07-09,12],gpu1").as_deref(), Some("node07"));
    assert_eq!(first_host("gpu1,node[1-2]").as_deref(), Some("gpu1"));
    assert_eq!(first_host("rack[3-4]-n").as_deref(), Some("rack3-n"));
    assert_eq!(first_host("solo").as_deref(), Some("solo"));
    assert_eq!(first_host("").as_deref(), None);
    assert_eq!(slurm_tasks_on_node("2(x3),1", 2), Some(2));
    assert_eq!(slurm_tasks_on_node("2(x3),1", 3), Some(1));
    assert_eq!(slurm_tasks_on_node("2(x3),1", 4), None);
}

#[test]
fn ipv6_master_is_bracketed() {
    let e = env(&with("MASTER_ADDR", "::1")).unwrap();
    assert_eq!(e.store_addr(), "[::1]:29500");
}

#[test]
fn a_workers_variables_read_back_as_the_same_place() {
    let read = |e: &DistEnv| {
        let vars = e.vars();
        DistEnv::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())).unwrap()
    };
    let local = DistEnv::local(2, 3, 29400);
    assert_eq!(read(&local), local);
    let spread = DistEnv {
        local_rank: 0,
        local_world_size: 2,
        master_addr: "node07".into(),
        job_token: JobToken::Given("secret".into()),
        ..DistEnv::local(2, 4, 29500)
    };
    assert_eq!(read(&spread), spread);
    let open = DistEnv { job_token: JobToken::Open, ..spread.clone() };
    assert_eq!(read(&open), open);
    let torchrun = DistEnv {
        job_token: JobToken::InTorchrunStore,
        torchrun_store: Some(TorchrunStore { run_id: "a1b2".into(), attempt: 3 }),
        ..spread
    };
    assert_eq!(read(&torchrun), torchrun);
}

#[test]
fn torchruns_shared_store_needs_no_token_and_each_attempt_has_its_own_keys() {
    let vars = |extra: &[(&str, &str)]| {
        let mut v: Vec<(String, String)> = [
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node07"),
            ("MASTER_PORT", "29500"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        v.reverse(); // the extra ones win
        move |k: &str| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
    // Several hosts, no token: refused unless torchrun's store is shared.
    assert!(DistEnv::from_lookup(vars(&[])).is_err());
    let shared = DistEnv::from_lookup(vars(&[
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RUN_ID", "job9"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ]))
    .unwrap();
    assert_eq!(shared.job_token, JobToken::InTorchrunStore);
    let store = shared.torchrun_store.unwrap();
    assert_eq!(store.key_prefix(), "/bonfire/job9/attempt_2/");
    let first = TorchrunStore { attempt: 0, ..store.clone() };
    assert_ne!(first.key_prefix(), store.key_prefix());
    // torchrun writes Python's `False` when it does not share its store.
    let own = DistEnv::from_lookup(vars(&[("TORCHELASTIC_USE_AGENT_STORE", "False"), ("BONFIRE_JOB_TOKEN", "s")]));
    assert_eq!(own.unwrap().torchrun_store, None);
    // A given token still wins.
    let given = DistEnv::from_lookup(vars(&[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("BONFIRE_JOB_TOKEN", "s")]));
    assert_eq!(given.unwrap().job_token, JobToken::Given("s".into()));
    let bad =
        DistEnv::from_lookup(vars(&[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "x")]));
    assert!(matches!(bad, Err(CommError::Env { var: "TORCHELASTIC_RESTART_COUNT", .. })));
}
