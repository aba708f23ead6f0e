//! The web chat (web/dist, built by scripts/build-web.sh) and the store's migrations are
//! embedded at compile time; rebuild when they change.
//!
//! `cfg(avx2_kernels)`: the target has the x86 features wisp's int8 matmul kernels are
//! written for (AVX2, FMA, F16C; `engine/qgemm.rs`), one name for the list.
//! `cfg(vnni_kernels)`: as well, `vpdpbusd` on 256-bit registers, from AVX-VNNI (Alder Lake,
//! Sapphire Rapids) or AVX512-VNNI with AVX512VL (Ice Lake, Zen 4).
fn main() {
    println!("cargo:rerun-if-changed=../web/dist");
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo::rustc-check-cfg=cfg(avx2_kernels)");
    println!("cargo::rustc-check-cfg=cfg(vnni_kernels)");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let has = |feature: &str| features.split(',').any(|f| f == feature);
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") && ["avx2", "fma", "f16c"].into_iter().all(has) {
        println!("cargo:rustc-cfg=avx2_kernels");
        if has("avxvnni") || (has("avx512vnni") && has("avx512vl")) {
            println!("cargo:rustc-cfg=vnni_kernels");
        }
    }
}
