//! diffloom's integration tests: one binary, a module per topic.

mod util;

mod browser;
mod cache;
mod cli;
mod clip_vision;
mod comfy;
mod conditioning;
mod controlnet;
mod coverage;
mod custom_sampling;
mod gligen;
mod graph_format;
mod image_codecs;
mod ksampler;
mod latent_mask;
mod lora;
mod lua;
mod model_patches;
mod models;
mod parity;
mod pickle;
mod pipelines;
mod queue;
mod sampling;
mod sd_nodes;
mod server;
mod sweep;
mod unclip;
mod upscale;
mod utility_nodes;
mod watch;
