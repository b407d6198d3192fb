//! The operand types of the CPU kernels: weights as stored (f32 or raw bf16 bits) and a raw
//! output pointer that threads writing disjoint regions may share.

/// A raw pointer that may cross threads; every user writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: used only to let threads write disjoint elements of one output buffer.
unsafe impl Send for SendPtr {}
// SAFETY: as above; no two threads touch the same element.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer; a method so closures capture the whole (Send) wrapper, not the raw field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Row-major `[n, k]` weights as stored.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    /// Raw bf16 bits.
    Bf16(&'a [u16]),
}

impl Weights<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }
}
