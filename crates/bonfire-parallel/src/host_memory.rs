//! Host memory that stays with the process from step to step.
//!
//! Burn's Flex backend allocates every op's output afresh. glibc's malloc,
//! by default, serves blocks of a few megabytes and more straight from the
//! kernel and hands them back when they are freed (and trims the top of its
//! heaps), so every training step faults the same memory in again, zeroed
//! page by page, a varying count from run to run (`cargo xtask bench ddp`
//! reports page faults per step). PyTorch's CPU performance guides
//! recommend loading jemalloc or tcmalloc in place of glibc's malloc for
//! this reason; the benchmarks give every process, PyTorch's too, the
//! settings below through `GLIBC_TUNABLES`.

/// Tells the C allocator to keep the memory the process frees instead of
/// handing it back to the kernel, so that after the first steps no training
/// step pays page faults for memory the step before freed. The process
/// keeps its peak memory in exchange. `bonfire train` and the benchmarks
/// call it first thing; call it at the start of `main`, before other
/// threads start. It does nothing where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; the values are in the
    // ranges glibc documents.
    unsafe {
        // Serve every block under 32 MiB, the most glibc allows here, from
        // the heap rather than from a mapping of its own...
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // ...never give a heap's free top back...
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // ...nor a whole heap that a thread's arena emptied: glibc keeps
        // one only when it has to keep this much spare at the top.
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::keep_freed_memory;

    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("procfs");
        let after_name = stat.rsplit_once(')').expect("a stat line").1;
        after_name.split_whitespace().nth(7).and_then(|f| f.parse().ok()).expect("the minflt field")
    }

    /// Faults of filling and freeing six blocks of 16 MiB (a 2048 x 2048
    /// f32 gradient each): more than one 64 MiB heap of a thread's arena.
    fn fill_and_free() -> u64 {
        let before = thread_faults();
        let blocks: Vec<Vec<u8>> = (0..6).map(|_| vec![1u8; 16 << 20]).collect();
        std::hint::black_box(&blocks);
        drop(blocks);
        thread_faults() - before
    }

    #[test]
    fn freed_memory_is_reused_without_faults() {
        // A process of its own: other tests' threads would share glibc's
        // arenas with this one and move its blocks around.
        let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["host_memory::tests::faults_after_warm_up", "--exact", "--ignored", "--test-threads=1"])
            .output()
            .expect("running the test binary");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    #[test]
    #[ignore = "run alone in a process of its own by freed_memory_is_reused_without_faults"]
    fn faults_after_warm_up() {
        keep_freed_memory();
        // Warm-up steps: the arena takes the shape the work needs.
        fill_and_free();
        fill_and_free();
        let again = fill_and_free();
        // 16 MiB is 4,096 pages; handed back, they would fault again.
        assert!(again < 64, "96 MiB filled again after it was freed took {again} page faults");
    }
}
