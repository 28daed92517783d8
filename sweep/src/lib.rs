//! Sweeps: a graph rendered for many parameter sets (prompts × seeds × strengths × samplers).
//!
//! [`grid`] expands `--grid name=values` arguments and CSV rows into jobs; [`job`] is what one job
//! carries and where its outputs go, written so that a job run twice produces its files once;
//! [`queue`] puts jobs on a Redis stream for workers and reads their progress back; [`events`] is what
//! a worker reports while a followed job runs.

pub mod events;
pub mod grid;
pub mod job;
pub mod queue;

pub use grid::{expand, Grid, SweepError};
pub use job::{job_files, sweep_id, Follow, Job, Publish};
