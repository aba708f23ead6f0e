//! The web chat (web/dist, built by scripts/build-web.sh) is embedded at compile time;
//! rebuild when it changes.
fn main() {
    println!("cargo:rerun-if-changed=../web/dist");
}
