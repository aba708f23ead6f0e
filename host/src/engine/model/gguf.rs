//! Reading an untrusted GGUF's header (llama.cpp `ggml/src/gguf.cpp`; the format:
//! `docs/gguf.md` of ggml). wisp parses it itself rather than with candle's reader, which
//! refuses a whole file over one tensor type candle has no kernel for (IQ4_NL, IQ4_XS,
//! MXFP4: types wisp's own kernel runs). Every length is bounded by the bytes left in the
//! file before anything is allocated for it, counts and nesting are capped, and nothing in
//! the file reaches arithmetic that can panic; a panic anyway (a bug) becomes an error.
//!
//! The result is candle's [`Content`] for the metadata and the tensors of types candle
//! knows, beside the tensors of the types only wisp's kernel takes ([`Header::foreign`]).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};

use crate::engine::qgemm::FileType;

/// The ggml tensor types wisp runs (candle's and wisp's kernels), by GGUF name.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4";

/// Caps on what a header may declare (candle's and llama.cpp's).
const MAX_STRING: u64 = 1 << 30;
const MAX_ELEMENTS: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 64;
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's names of the types GGUF files use (`ggml.h`), for error messages.
fn type_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => "unknown",
    }
}

/// A tensor of a type only wisp's block kernel runs.
#[derive(Debug, Clone)]
pub struct ForeignTensor {
    pub file_type: FileType,
    /// Rows first (GGUF's order reversed), as candle's shapes.
    pub dims: Vec<usize>,
    /// From the start of the tensor data.
    pub offset: u64,
}

/// A GGUF's metadata and tensor table.
pub struct Header {
    pub content: Content,
    /// Tensors of the types candle has no kernel for, by name.
    pub foreign: HashMap<String, ForeignTensor>,
}

/// The header of the GGUF in `reader`.
pub fn read_header<R: Read + Seek>(reader: &mut R) -> Result<Header, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(reader))) {
        Ok(Ok(header)) => Ok(header),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("not a valid GGUF file: its header is malformed".into()),
    }
}

/// A reader that knows how many bytes the file has left.
struct Bounded<'a, R> {
    reader: &'a mut R,
    pos: u64,
    size: u64,
    /// GGUF v1 writes lengths and dimensions as u32, later versions as u64.
    v1: bool,
}

type Parse<T> = Result<T, String>;

fn invalid(what: impl std::fmt::Display) -> String {
    format!("not a valid GGUF file: {what}")
}

impl<R: Read> Bounded<'_, R> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self) -> Parse<[u8; N]> {
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).map_err(|_| invalid("it ends inside its header"))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Parse<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Parse<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    fn length(&mut self) -> Parse<u64> {
        if self.v1 { self.u32().map(u64::from) } else { self.u64() }
    }

    fn string(&mut self) -> Parse<String> {
        let len = self.length()?;
        if len > MAX_STRING || len > self.remaining() {
            return Err(invalid(format!("a string of {len} bytes with {} left in the file", self.remaining())));
        }
        let mut v = vec![0u8; len as usize];
        self.reader.read_exact(&mut v).map_err(|_| invalid("it ends inside a string"))?;
        self.pos += len;
        // Strings are not NUL-terminated, but some writers add one.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// A metadata value of type `ty`.
    fn value(&mut self, ty: u32, depth: usize) -> Parse<Value> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!("values nested more than {MAX_DEPTH} deep")));
        }
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(self.bytes().map(u16::from_le_bytes)?),
            3 => Value::I16(self.bytes().map(i16::from_le_bytes)?),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.bytes().map(i32::from_le_bytes)?),
            6 => Value::F32(self.bytes().map(f32::from_le_bytes)?),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(invalid(format!("a boolean of value {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                let ty = self.u32()?;
                let len = self.length()?;
                let needed = len.saturating_mul(self.min_size(ty)?);
                if len > MAX_ELEMENTS || needed > self.remaining() {
                    return Err(invalid(format!("an array of {len} values with {} bytes left in the file", self.remaining())));
                }
                let mut values = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    values.push(self.value(ty, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.bytes().map(i64::from_le_bytes)?),
            12 => Value::F64(self.bytes().map(f64::from_le_bytes)?),
            _ => return Err(invalid(format!("a metadata value of unknown type {ty}"))),
        })
    }

    /// The fewest bytes a value of type `ty` takes.
    fn min_size(&self, ty: u32) -> Parse<u64> {
        Ok(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            // A length prefix, then the elements.
            8 | 9 if self.v1 => 4,
            8 | 9 => 8,
            _ => return Err(invalid(format!("a metadata value of unknown type {ty}"))),
        })
    }
}

fn parse<R: Read + Seek>(reader: &mut R) -> Parse<Header> {
    let io = |e: std::io::Error| invalid(e);
    let start = reader.stream_position().map_err(io)?;
    let size = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut r = Bounded { reader, pos: start, size, v1: false };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(invalid("it does not start with `GGUF`"));
    }
    let magic = match r.u32()? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(invalid(format!("unsupported version {v}"))),
    };
    r.v1 = magic == VersionedMagic::GgufV1;
    let (n_tensors, n_kv) = (r.length()?, r.length()?);
    // Each entry takes at least a length prefix and a few fixed fields.
    let needed = n_kv.saturating_mul(r.min_size(8)? + 5).saturating_add(n_tensors.saturating_mul(r.min_size(8)? + 16));
    if n_tensors > MAX_ELEMENTS || n_kv > MAX_ELEMENTS || needed > r.remaining() {
        return Err(invalid(format!("{n_tensors} tensors and {n_kv} metadata entries declared in {} bytes", r.remaining())));
    }
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0)?;
        metadata.insert(key, value);
    }
    let (mut tensor_infos, mut foreign) = (HashMap::new(), HashMap::new());
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            return Err(invalid(format!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let mut dims = (0..n_dims).map(|_| r.length().map(|d| d as usize)).collect::<Parse<Vec<_>>>()?;
        if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none() {
            return Err(invalid(format!("tensor `{name}` has {dims:?} elements")));
        }
        dims.reverse();
        let type_id = r.u32()?;
        let offset = r.u64()?;
        match FileType::from_id(type_id) {
            Some(FileType::Ggml(ggml_dtype)) => {
                tensor_infos.insert(name, TensorInfo { ggml_dtype, shape: dims.into(), offset });
            }
            Some(file_type) => {
                foreign.insert(name, ForeignTensor { file_type, dims, offset });
            }
            None => {
                return Err(format!(
                    "tensor `{name}` is of type {type_id} ({}), which wisp does not run (supported: {SUPPORTED_TYPES})",
                    type_name(type_id)
                ));
            }
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.to_u64().ok().or_else(|| v.to_i32().ok().and_then(|a| u64::try_from(a).ok())) {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(invalid(format!("`general.alignment` is {v:?}"))),
        },
    };
    let tensor_data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
    Ok(Header { content: Content { magic, metadata, tensor_infos, tensor_data_offset }, foreign })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file declaring `n_tensors` tensors and `n_kv` metadata entries, then `body`
    /// (their encoding, as much of it as a case needs).
    fn header(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b.extend(body);
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    fn read(bytes: Vec<u8>) -> Result<Header, String> {
        read_header(&mut std::io::Cursor::new(bytes))
    }

    #[test]
    fn declared_sizes_beyond_the_file_are_refused_before_anything_is_allocated() {
        // An array claiming 2^29 u8 values, a string claiming 2^40 bytes, a billion tensors.
        let mut array = string("k");
        array.extend(9u32.to_le_bytes());
        array.extend(0u32.to_le_bytes());
        array.extend((1u64 << 29).to_le_bytes());
        let err = read(header(0, 1, &array)).err().unwrap();
        assert!(err.contains("array of 536870912 values"), "{err}");
        let mut long = (1u64 << 40).to_le_bytes().to_vec();
        long.extend(b"a key of a few bytes");
        let err = read(header(0, 1, &long)).err().unwrap();
        assert!(err.contains("string of 1099511627776 bytes"), "{err}");
        let err = read(header(1 << 30, 0, &[])).err().unwrap();
        assert!(err.contains("1073741824 tensors"), "{err}");
        // Nesting past the cap: arrays of arrays, 100 deep.
        let mut nested = string("k");
        nested.extend(9u32.to_le_bytes());
        for _ in 0..100 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        nested.extend(vec![0u8; 64]);
        let err = read(header(0, 1, &nested)).err().unwrap();
        assert!(err.contains("nested"), "{err}");
    }

    #[test]
    fn tensor_types_are_sorted_into_candles_and_wisps_and_unknown_ones_named() {
        let mut body = string("general.alignment");
        body.extend(4u32.to_le_bytes());
        body.extend(64u32.to_le_bytes());
        for (name, ty) in [("a", 8u32), ("b", 39)] {
            body.extend(string(name));
            body.extend(2u32.to_le_bytes());
            body.extend(32u64.to_le_bytes());
            body.extend(4u64.to_le_bytes());
            body.extend(ty.to_le_bytes());
            body.extend(0u64.to_le_bytes());
        }
        let h = read(header(2, 1, &body)).unwrap();
        assert_eq!(h.content.tensor_infos["a"].shape.dims(), [4, 32], "rows first");
        assert_eq!(h.foreign["b"].file_type, FileType::Mxfp4);
        assert_eq!(h.content.tensor_data_offset % 64, 0);
        // The same file with tensor b of type 16 (IQ2_XXS).
        let at = body.len() - 12;
        body[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
        let err = read(header(2, 1, &body)).err().unwrap();
        assert!(err.contains("`b`") && err.contains("IQ2_XXS"), "{err}");
        // An alignment that is not a power of two (after the key's 8-byte length and 17
        // bytes, and its type).
        body[at..at + 4].copy_from_slice(&39u32.to_le_bytes());
        body[29..33].copy_from_slice(&48u32.to_le_bytes());
        assert!(read(header(2, 1, &body)).err().unwrap().contains("general.alignment"));
    }
}
