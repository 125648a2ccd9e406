//! The parser fuzzer of tests/fuzz_parsers.rs for longer: `cargo bench --bench fuzz -- [INPUTS_PER_PARSER] [SEED]`
//! (default 20000 inputs per parser, seed 18). Prints how many inputs each parser saw and exits non-zero on the
//! first parser with a panic, a hang or an allocation beyond the bound; failing inputs are saved to files.

#[allow(dead_code)]
#[path = "../tests/fuzz_parsers.rs"]
mod fuzz_parsers;

fn main() {
    // `cargo bench` passes `--bench`; numbers are ours.
    let numbers: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let cases = numbers.first().map(|&n| n as usize).unwrap_or(20_000);
    let seed = numbers.get(1).copied().unwrap_or(18);
    let mut failed = false;
    for target in fuzz_parsers::targets() {
        let report = fuzz_parsers::fuzz(&target, cases, seed);
        fuzz_parsers::print_report(&report);
        for f in &report.failures {
            eprintln!("{f}\n");
        }
        failed |= !report.failures.is_empty();
    }
    if failed {
        std::process::exit(1);
    }
}
