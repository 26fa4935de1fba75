//! The `rbdback` command.

fn main() {
    eprintln!("rbdback: no command yet");
    std::process::exit(2);
}
