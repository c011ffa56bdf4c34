//! Image conversion to eStargz.

pub mod image;
pub mod layer;

pub use image::{convert_image, estargz_layers, ConvertedImage, ImageConvertError, ImageSource};
pub use layer::{convert_tar, LayerConvertError, LayerConvertOptions};
