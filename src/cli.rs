//! The command-line definition (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Runs Stable Diffusion workflows saved as RON node graphs.
#[derive(Parser, Debug)]
#[command(name = "diffloom", about, disable_version_flag = true, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print the version; with -v also libtorch's, CUDA support and the CPU's bf16 support.
    #[arg(short = 'V', long)]
    pub version: bool,
    /// Where tensors are computed: cpu, cuda or cuda:N (default: CUDA when available, else CPU).
    #[arg(long, global = true)]
    pub device: Option<String>,
    /// Print more (load times, memory).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Another directory of Lua plugins (besides the shipped plugins/lua). Repeatable.
    #[arg(long = "plugins", value_name = "DIR", global = true)]
    pub plugins: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate and run a graph; writes what its output nodes produce.
    Run {
        #[command(flatten)]
        args: RunArgs,
    },
    /// Run a graph, then re-run it on every save of the graph file or of the input files it reads,
    /// re-executing only what changed. Ctrl-C quits.
    Watch {
        #[command(flatten)]
        args: RunArgs,
        /// Memory for cached results (models included), in MiB.
        #[arg(long, default_value_t = 16384)]
        cache_mb: usize,
        /// Quiet time after a save before re-running, in milliseconds (editors write in bursts).
        #[arg(long, default_value_t = 100)]
        debounce_ms: u64,
    },
    /// Render a graph once per parameter set: the product of the --grid values, times the --rows of a
    /// CSV file. Each job writes into OUTPUT/SWEEP-ID/JOB-INDEX/; a sweep run again skips finished jobs.
    /// With --queue the jobs go on a Redis stream for `diffloom worker`s instead.
    Sweep(SweepCmd),
    /// Run sweep jobs from a Redis stream (see `sweep --queue`) until Ctrl-C: models stay loaded
    /// between jobs; outputs go to OUTPUT/SWEEP-ID/JOB-INDEX/.
    Worker(WorkerArgs),
    /// Check a graph without running it; prints every problem found.
    Validate {
        file: PathBuf,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Print a graph: as Graphviz DOT, or as text in execution order.
    Show {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: ShowFormat,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Convert a ComfyUI workflow (UI or API JSON, or a PNG/WebP that carries one) into a RON graph.
    Import {
        /// The workflow: .json, .png or .webp.
        file: PathBuf,
        /// Where to write the RON graph (never over an existing file); standard output without it.
        #[arg(short, long, value_name = "OUT.ron")]
        output: Option<PathBuf>,
    },
    /// Write a graph as a ComfyUI workflow: API JSON (for POST /prompt) or UI JSON (for the canvas).
    Export {
        /// The graph (.ron, or any workflow `run` reads).
        file: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Where to write the JSON (never over an existing file); standard output without it.
        #[arg(short, long, value_name = "OUT.json")]
        output: Option<PathBuf>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Models directories (ComfyUI layout): model paths inside them are written as ComfyUI names them.
        #[arg(long = "models", value_name = "DIR")]
        models: Vec<PathBuf>,
        #[arg(long = "extra-model-paths", value_name = "FILE")]
        extra_model_paths: Vec<PathBuf>,
    },
    /// Serve ComfyUI's HTTP and WebSocket API (and its web frontend) over diffloom's executor.
    Serve {
        /// Address to listen on; anything but loopback requires --token.
        #[arg(long, default_value = "127.0.0.1")]
        listen: std::net::IpAddr,
        #[arg(long, default_value_t = 8188)]
        port: u16,
        /// A models directory in ComfyUI's layout. Repeatable.
        #[arg(long = "models", value_name = "DIR")]
        models: Vec<PathBuf>,
        #[arg(long = "extra-model-paths", value_name = "FILE")]
        extra_model_paths: Vec<PathBuf>,
        /// Directory of RON graphs (relative paths in prompts resolve here).
        #[arg(long, value_name = "DIR", default_value = "graphs")]
        graphs: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "input")]
        input_dir: PathBuf,
        #[arg(short, long, default_value = "output")]
        output_dir: PathBuf,
        /// Settings and user data.
        #[arg(long, value_name = "DIR", default_value = "user")]
        user_dir: PathBuf,
        /// The ComfyUI frontend's static files (default: the comfyui-frontend-package in .venv).
        #[arg(long, value_name = "DIR")]
        front_end_root: Option<PathBuf>,
        /// A secret every request must carry (required when listening beyond loopback).
        #[arg(long)]
        token: Option<String>,
        /// Memory for cached results (models included), in MiB.
        #[arg(long, default_value_t = 16384)]
        cache_mb: usize,
        /// Floating-point type of model weights.
        #[arg(long, value_enum)]
        dtype: Option<Dtype>,
        /// Live previews when a prompt does not choose: none (ComfyUI's default), latent2rgb, taesd or
        /// auto (TAESD when vae_approx holds its decoder, else latent2rgb).
        #[arg(long, default_value = "none", value_parser = ["none", "auto", "latent2rgb", "taesd"])]
        preview_method: String,
        /// Run the prompts on the workers of this queue (`diffloom worker --queue URL`), relaying their
        /// progress and images back, instead of here: redis[s]://[:PASSWORD@]HOST:PORT/STREAM.
        #[arg(long, value_name = "URL")]
        queue: Option<String>,
        /// The workers' consumer group, with --queue.
        #[arg(long, default_value = diffloom_sweep::queue::DEFAULT_GROUP, requires = "queue")]
        group: String,
    },
    /// List the available node types with their inputs and outputs.
    Nodes {
        /// Only this node type.
        name: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Which of ComfyUI's built-in nodes diffloom's built-in nodes cover, as Markdown (README.md's
        /// "ComfyUI node coverage" section; plugins not counted).
        #[arg(long, conflicts_with_all = ["name", "json"])]
        coverage: bool,
    },
}

/// What `run` and `watch` both take.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The graph file (.ron).
    pub file: PathBuf,
    /// Override a graph parameter: --set seed=42 --set prompt="a cat". Repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Directory output nodes write into.
    #[arg(short, long, default_value = "output")]
    pub output_dir: PathBuf,
    /// Floating-point type of model weights (default: fp32 on the CPU, fp16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// A models directory in ComfyUI's layout (checkpoints/, loras/, vae/, upscale_models/, embeddings/,
    /// controlnet/, …): model names in graphs are looked up in it. Repeatable; searched in order.
    #[arg(long = "models", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// A ComfyUI extra_model_paths.yaml whose folders are searched too (an existing ComfyUI install's).
    /// Repeatable.
    #[arg(long = "extra-model-paths", value_name = "FILE")]
    pub extra_model_paths: Vec<PathBuf>,
    /// Directory of textual inversions for `embedding:name` in prompts (besides the models folders').
    #[arg(long, value_name = "DIR")]
    pub embeddings: Option<PathBuf>,
    /// Where LoadImage's image names are looked up, as ComfyUI's input directory.
    #[arg(long, value_name = "DIR", default_value = "input")]
    pub input_dir: PathBuf,
    /// The persistent result cache, shared by runs, processes and machines on one mount (default:
    /// $DIFFLOOM_CACHE_DIR, else $XDG_CACHE_HOME/diffloom, else ~/.cache/diffloom).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Keep results in memory only (no persistent cache).
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_disk_cache: bool,
    /// Size bound of the persistent cache in MiB; the least recently used results go first.
    #[arg(long, value_name = "MIB", default_value_t = 10240)]
    pub disk_cache_mb: u64,
    /// Memory one operation may use, in MiB: the VAE decodes in smaller batches, then in tiles, when
    /// its estimated peak is larger (it also retries in tiles when the device runs out of memory).
    #[arg(long, value_name = "MIB")]
    pub max_memory: Option<u64>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Dtype {
    Fp32,
    Fp16,
    Bf16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::Fp32 => tch::Kind::Float,
            Dtype::Fp16 => tch::Kind::Half,
            Dtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// ComfyUI's API format, as `POST /prompt` takes it (parameters inlined).
    Api,
    /// ComfyUI's UI format, as the canvas opens it (parameters as primitive nodes).
    Ui,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ShowFormat {
    Text,
    Dot,
}

/// `diffloom sweep`: a graph and its grids, or one of the subcommands for a queued sweep.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SweepCmd {
    #[command(subcommand)]
    pub action: Option<SweepAction>,
    #[command(flatten)]
    pub args: Option<RunArgs>,
    /// A parameter and its values: seed=1..100 (both ends), cfg=4..8:0.5 (a step), sampler=euler,dpmpp_2m
    /// (a list). Several grids multiply. Repeatable.
    #[arg(long = "grid", value_name = "NAME=VALUES")]
    pub grids: Vec<String>,
    /// A CSV file: the header names parameters, each row is one job (combined with every grid point).
    #[arg(long, value_name = "FILE")]
    pub rows: Option<PathBuf>,
    /// Submit the jobs to this Redis stream (redis://[:PASSWORD@]HOST:PORT/STREAM, or rediss:// for
    /// TLS) instead of running them; prints the sweep id.
    #[arg(long, value_name = "URL")]
    pub queue: Option<String>,
    /// The consumer group the workers read in (created when missing).
    #[arg(long, value_name = "NAME", default_value = diffloom_sweep::queue::DEFAULT_GROUP)]
    pub group: String,
    /// Workers also put each finished job's files on the queue, for `sweep fetch` (when their output
    /// folders are their own disks, not one shared mount).
    #[arg(long, requires = "queue")]
    pub collect: bool,
}

/// What is done to a queued sweep.
#[derive(Subcommand, Debug)]
pub enum SweepAction {
    /// Done / running / pending / failed counts, per-worker throughput and the failures' errors.
    Status {
        /// The sweep id `sweep --queue` printed.
        id: String,
        #[arg(long, value_name = "URL", required = true)]
        queue: String,
        /// Show a progress bar until every job has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Gather a `--collect` sweep's files from the queue into OUTPUT/SWEEP-ID/JOB-INDEX/ (files there
    /// already are kept); fetched files leave the queue.
    Fetch {
        id: String,
        #[arg(long, value_name = "URL", required = true)]
        queue: String,
        #[arg(short, long, default_value = "output")]
        output_dir: PathBuf,
        /// Keep fetching until every job has ended.
        #[arg(long)]
        wait: bool,
    },
    /// Drop the sweep's jobs not yet taken; workers skip its remaining jobs and stop a running one.
    Cancel {
        id: String,
        #[arg(long, value_name = "URL", required = true)]
        queue: String,
        #[arg(long, value_name = "NAME", default_value = diffloom_sweep::queue::DEFAULT_GROUP)]
        group: String,
    },
}

/// What `diffloom worker` takes.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The Redis stream to read jobs from: redis://[:PASSWORD@]HOST:PORT/STREAM (rediss:// for TLS).
    #[arg(long, value_name = "URL")]
    pub queue: String,
    /// The consumer group to join (created when missing).
    #[arg(long, value_name = "NAME", default_value = diffloom_sweep::queue::DEFAULT_GROUP)]
    pub group: String,
    /// This worker's consumer name, unique in the group (default: HOSTNAME-PID).
    #[arg(long, value_name = "WORKER")]
    pub name: Option<String>,
    /// Directory the jobs' outputs go into (a shared mount when workers run on several machines).
    #[arg(short, long, default_value = "output")]
    pub output_dir: PathBuf,
    /// Torch's intra-op threads (default: torch's choice, one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// A job left pending this long by another worker (dead or stuck) is taken over, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub claim_timeout: f64,
    /// Deliveries of a job beyond the first before it goes to the dead-letter stream instead.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_retries: usize,
    /// Jobs from people you do not trust: file names in their graphs must resolve inside this worker's
    /// models and input folders (no absolute paths, no `..`, no paths beside the submitter's graph).
    #[arg(long)]
    pub confine: bool,
    /// Stop after this many jobs (for tests and batch machines).
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<usize>,
    /// Memory for cached results kept between jobs (models included), in MiB.
    #[arg(long, default_value_t = 16384)]
    pub cache_mb: usize,
    /// Floating-point type of model weights (default: fp32 on the CPU, fp16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// A models directory in ComfyUI's layout. Repeatable; searched in order.
    #[arg(long = "models", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    #[arg(long = "extra-model-paths", value_name = "FILE")]
    pub extra_model_paths: Vec<PathBuf>,
    #[arg(long, value_name = "DIR")]
    pub embeddings: Option<PathBuf>,
    #[arg(long, value_name = "DIR", default_value = "input")]
    pub input_dir: PathBuf,
    /// The persistent result cache (see `run --cache-dir`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_disk_cache: bool,
    #[arg(long, value_name = "MIB", default_value_t = 10240)]
    pub disk_cache_mb: u64,
    /// Memory one operation may use, in MiB (see `run --max-memory`).
    #[arg(long, value_name = "MIB")]
    pub max_memory: Option<u64>,
}
