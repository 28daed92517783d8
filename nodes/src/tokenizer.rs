//! The CLIP BPE tokenizer, built with the `tokenizers` crate exactly as transformers builds
//! `CLIPTokenizer` from `vocab.json` and `merges.txt` (NFC, whitespace runs to one space, lowercase;
//! CLIP's split regex then byte-level; BPE with the `</w>` end-of-word suffix).
//!
//! The vocabulary comes from a diffusers folder's `tokenizer/`, or from the `open-clip-torch` wheel on
//! PyPI (`open_clip/bpe_simple_vocab_16e6.txt.gz`), which `scripts/setup.sh` converts with
//! `scripts/clip_vocab.py` into `models/clip-tokenizer/`.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// `<|startoftext|>`.
pub const START: u32 = 49406;
/// `<|endoftext|>`.
pub const END: u32 = 49407;

/// CLIP's word split (transformers' `CLIPTokenizer`, from OpenAI's `SimpleTokenizer.pat`).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The environment variable naming a directory with `vocab.json` and `merges.txt`.
pub const VOCAB_DIR_VAR: &str = "DIFFLOOM_CLIP_VOCAB_DIR";

pub struct ClipTokenizer {
    inner: Tokenizer,
}

impl ClipTokenizer {
    /// Builds the tokenizer from a directory holding `vocab.json` and `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer, String> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(format!("{}: not found (CLIP tokenizer vocabulary)", f.display()));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token("<|endoftext|>".into())
            .end_of_word_suffix("</w>".into())
            .continuing_subword_prefix(String::new())
            .build()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut tk = Tokenizer::new(bpe);
        let spaces = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| e.to_string())?;
        tk.with_normalizer(Some(NormSequence::new(vec![NFC.into(), spaces.into(), Lowercase.into()])));
        let split = Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| e.to_string())?;
        // Every chunk the CLIP split leaves is a single match of ByteLevel's own regex, so ByteLevel
        // only maps bytes to its characters here.
        tk.with_pre_tokenizer(Some(PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
        tk.add_special_tokens(&[AddedToken::from("<|startoftext|>", true), AddedToken::from("<|endoftext|>", true)]);
        Ok(ClipTokenizer { inner: tk })
    }

    /// The default vocabulary: `$DIFFLOOM_CLIP_VOCAB_DIR`, else `models/clip-tokenizer` in the first
    /// ancestor of the executable that has one (a checkout's `target/…` binaries find the set-up's).
    pub fn locate_default() -> Result<PathBuf, String> {
        if let Some(dir) = std::env::var_os(VOCAB_DIR_VAR) {
            return Ok(PathBuf::from(dir));
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join("models").join("clip-tokenizer");
            if candidate.join("vocab.json").is_file() {
                return Ok(candidate);
            }
        }
        Err(format!(
            "the CLIP tokenizer vocabulary was not found: run scripts/setup.sh (it extracts it from the \
             open-clip-torch wheel into models/clip-tokenizer) or set {VOCAB_DIR_VAR}"
        ))
    }

    /// Token ids of `text`, without start and end tokens.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }
}
