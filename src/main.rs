fn main() {
    println!("onehead {}", env!("CARGO_PKG_VERSION"));
}
