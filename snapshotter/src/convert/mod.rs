//! Image conversion to eStargz.

pub mod layer;

pub use layer::{convert_tar, LayerConvertError, LayerConvertOptions};
