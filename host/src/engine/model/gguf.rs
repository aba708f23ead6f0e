//! Reading an untrusted GGUF's header: candle's parser bounds every length by the file's
//! size, but a few values still reach arithmetic that panics (a `general.alignment` of 0
//! divides by zero), and a tensor type it does not know comes back as a bare number. Here
//! any panic of the parser becomes an error, and an unknown type is named with the types
//! wisp runs.

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file::Content;

/// The ggml tensor types wisp runs (candle's and wisp's kernels), by GGUF name.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// ggml's names of the types GGUF files use (`ggml.h`), for error messages.
fn type_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The header (metadata and tensor table) of the GGUF in `reader`.
pub fn read_header<R: Read + Seek>(reader: &mut R) -> Result<Content, String> {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(reader)));
    match read {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(e)) => {
            let message = super::error_message(&e);
            // candle: "unknown dtype for tensor N".
            match message.rsplit_once("unknown dtype for tensor ").and_then(|(_, n)| n.trim().parse::<u32>().ok()) {
                Some(id) => Err(format!("tensor type {id} ({}) is not supported (supported: {SUPPORTED_TYPES})", type_name(id))),
                None => Err(format!("not a valid GGUF file: {message}")),
            }
        }
        Err(_) => Err("not a valid GGUF file: its header is malformed".into()),
    }
}
