fn main() {
    std::process::exit(billion::cli::main());
}
