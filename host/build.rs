//! The web chat (web/dist, built by scripts/build-web.sh) and the store's migrations are
//! embedded at compile time; rebuild when they change.
fn main() {
    println!("cargo:rerun-if-changed=../web/dist");
    println!("cargo:rerun-if-changed=migrations");
}
