//! Image conversion to eStargz, and unpacking an image for a recording run.

pub mod image;
pub mod layer;
mod layout;
pub mod unpack;

pub use image::{
    convert_image, estargz_layers, unpack_image, ConvertedImage, ImageConvertError, ImageSource,
    RunConfig, UnpackedImage,
};
pub use layer::{convert_tar, LayerConvertError, LayerConvertOptions};
pub use unpack::UnpackError;
