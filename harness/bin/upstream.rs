//! `outrigger-bench-upstream`: the test app as its own process, for the
//! benchmarks (so the direct baseline crosses a process boundary like the
//! proxied paths do). One thread. Prints its address, serves until stdin
//! closes.

use std::io::Read;

use outrigger_e2e::upstream::HttpUpstream;

fn main() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrigger-bench-upstream: {e}");
            std::process::exit(1);
        }
    };
    // Exit when the parent goes away.
    std::thread::spawn(|| {
        let mut buf = [0u8; 1];
        let _ = std::io::stdin().read(&mut buf);
        std::process::exit(0);
    });
    runtime.block_on(async {
        let app = HttpUpstream::start("bench").await;
        println!("{}", app.addr);
        std::future::pending::<()>().await;
    });
}
