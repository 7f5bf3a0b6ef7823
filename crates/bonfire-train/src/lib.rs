//! Bonfire's trainer as a library: what `bonfire train` and `bonfire launch`
//! run, for programs that want the same without the command line.
//!
//! - [`trainer::train`]: one worker's training loop (single device, DP or
//!   DDP) over an image dataset, with step checkpoints and a [`trainer::Report`].
//! - [`model`]: the LeNet-5 and ResNet the command trains.
//! - [`checkpoint`], [`weights`]: resumable checkpoints and safetensors
//!   weights that standard tools open.
//! - [`data`]: the data sets, downloaded where they are missing.
//! - [`metrics`], [`plot`]: the metrics files and the loss curve.
//! - [`launch`]: the elastic launcher that starts, watches and restarts
//!   worker processes.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod trainer;
pub mod weights;
