//! From prompt text to CLIP token windows with per-token weights, as ComfyUI's `sd1_clip.py` does it:
//! `(text:1.3)` and `(text)` (×1.1, nesting multiplies, an explicit weight replaces), `\(` `\)` escapes,
//! `[text]` literal (ComfyUI gives brackets no meaning), `embedding:name` textual inversions, and 77-token
//! windows (start, 75 tokens, end, padding) that keep words of fewer than 8 tokens whole.

use crate::tokenizer::{ClipTokenizer, END, START};

/// One position of a token window.
#[derive(Clone, Debug, PartialEq)]
pub enum Slot {
    Token(u32),
    /// Row `row` of the embedding at index `embedding` of [`Windows::embeddings`].
    Embedding {
        embedding: usize,
        row: i64,
    },
}

/// The prompt cut into 77-slot windows, each slot with its weight.
#[derive(Debug, Default)]
pub struct Windows {
    pub windows: Vec<Vec<(Slot, f64)>>,
    /// Textual-inversion vectors referenced by slots: `[n, dim]` each.
    pub embeddings: Vec<tch::Tensor>,
}

/// Looks up `embedding:name`: the vectors `[n, dim]`, or an error message.
pub trait EmbeddingSource {
    fn embedding(&self, name: &str) -> Result<tch::Tensor, String>;
}

const WINDOW: usize = 77;
/// ComfyUI's `max_word_length`: a word this long may be split across windows.
const MAX_WORD: usize = 8;
const IDENT: &str = "embedding:";

/// ComfyUI's `token_weights`: splits `text` into segments with weights.
pub fn parse_weights(text: &str) -> Vec<(String, f64)> {
    let escaped = text.replace("\\)", "\0\u{1}").replace("\\(", "\0\u{2}");
    token_weights(&escaped, 1.0).into_iter().map(|(s, w)| (s.replace("\0\u{1}", ")").replace("\0\u{2}", "("), w)).collect()
}

fn parse_parentheses(s: &str) -> Vec<String> {
    let mut result = Vec::new();
    let mut current = String::new();
    let mut level: i64 = 0;
    for c in s.chars() {
        match c {
            '(' => {
                if level == 0 {
                    if !current.is_empty() {
                        result.push(std::mem::take(&mut current));
                    }
                    current.push('(');
                } else {
                    current.push(c);
                }
                level += 1;
            }
            ')' => {
                level -= 1;
                if level == 0 {
                    current.push(')');
                    result.push(std::mem::take(&mut current));
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        result.push(current);
    }
    result
}

fn token_weights(s: &str, current: f64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for x in parse_parentheses(s) {
        if x.chars().count() >= 2 && x.starts_with('(') && x.ends_with(')') {
            let mut inner = x[1..x.len() - 1].to_owned();
            let mut weight = current * 1.1;
            if let Some(colon) = inner.rfind(':').filter(|i| *i > 0) {
                if let Some(w) = parse_python_float(&inner[colon + 1..]) {
                    weight = w;
                    inner.truncate(colon);
                }
            }
            out.extend(token_weights(&inner, weight));
        } else {
            out.push((x, current));
        }
    }
    out
}

/// Python's `float()` on a string: surrounding whitespace, underscores between digits, inf/nan.
fn parse_python_float(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty() || t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    t.replace('_', "").parse::<f64>().ok()
}

/// Splits a segment where `embedding:` starts it or follows whitespace (ComfyUI's
/// `re.split(r'(?<=\s)embedding:')`, plus a segment that starts with it).
fn split_embeddings(segment: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut start = 0;
    let bytes = segment.as_bytes();
    let mut i = 0;
    while let Some(found) = segment[i..].find(IDENT) {
        let at = i + found;
        let after_space = at > 0 && segment[..at].chars().next_back().is_some_and(char::is_whitespace);
        if after_space {
            parts.push(segment[start..at].to_owned());
            start = at;
        }
        i = at + IDENT.len();
        if i >= bytes.len() {
            break;
        }
    }
    parts.push(segment[start..].to_owned());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Tokenizes `text` into weighted windows. `pad` is 49407 for SD 1.x (pads with the end token) and 0
/// for SD 2.x. An `embedding:name` that cannot be loaded is an error (ComfyUI only warns and drops it;
/// a silently ignored word is a worse surprise).
pub fn tokenize(tok: &ClipTokenizer, text: &str, pad: u32, embeddings: Option<&dyn EmbeddingSource>) -> Result<Windows, String> {
    let mut out = Windows::default();
    let mut groups: Vec<Vec<(Slot, f64)>> = Vec::new();
    for (segment, weight) in parse_weights(text) {
        for word in split_embeddings(&segment) {
            let mut word = word;
            if let (Some(rest), Some(source)) = (word.strip_prefix(IDENT), embeddings) {
                let rest = rest.trim_matches('\n');
                let mut split = rest.split_whitespace();
                let mut name = split.next().unwrap_or("").to_owned();
                let mut leftover: Vec<String> = split.map(str::to_owned).collect();
                if let Some(cut) = name.find(['<', '[']) {
                    leftover.insert(0, name[cut..].to_owned());
                    name.truncate(cut);
                }
                let vectors = match source.embedding(&name) {
                    Ok(v) => v,
                    Err(first) => {
                        let stripped = name.trim_matches(',');
                        if stripped.len() < name.len() && !stripped.is_empty() {
                            let v = source.embedding(stripped).map_err(|_| first)?;
                            leftover.insert(0, name[stripped.len()..].to_owned());
                            v
                        } else {
                            return Err(first);
                        }
                    }
                };
                let vectors = if vectors.dim() == 1 { vectors.unsqueeze(0) } else { vectors };
                let index = out.embeddings.len();
                let rows = vectors.size()[0];
                out.embeddings.push(vectors);
                groups.push((0..rows).map(|row| (Slot::Embedding { embedding: index, row }, weight)).collect());
                word = leftover.join(" ");
                if word.is_empty() {
                    continue;
                }
            }
            let ids = tok.ids(&word)?;
            groups.push(ids.into_iter().map(|t| (Slot::Token(t), weight)).collect());
        }
    }

    // ComfyUI's windowing: 75 tokens between start and end; a word shorter than MAX_WORD tokens that does
    // not fit moves whole to the next window.
    let mut window: Vec<(Slot, f64)> = vec![(Slot::Token(START), 1.0)];
    for group in groups {
        let is_large = group.len() >= MAX_WORD;
        let mut group = group.as_slice();
        while !group.is_empty() {
            if group.len() + window.len() > WINDOW - 1 {
                let remaining = WINDOW - window.len() - 1;
                if is_large {
                    window.extend_from_slice(&group[..remaining]);
                    window.push((Slot::Token(END), 1.0));
                    group = &group[remaining..];
                } else {
                    window.push((Slot::Token(END), 1.0));
                    window.extend(std::iter::repeat_n((Slot::Token(pad), 1.0), remaining));
                }
                out.windows.push(std::mem::replace(&mut window, vec![(Slot::Token(START), 1.0)]));
            } else {
                window.extend_from_slice(group);
                group = &[];
            }
        }
    }
    window.push((Slot::Token(END), 1.0));
    let fill = WINDOW - window.len();
    window.extend(std::iter::repeat_n((Slot::Token(pad), 1.0), fill));
    out.windows.push(window);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str) -> Vec<(String, f64)> {
        parse_weights(text).into_iter().map(|(s, w)| (s, (w * 1e6).round() / 1e6)).collect()
    }

    fn seg(s: &str, weight: f64) -> (String, f64) {
        (s.to_owned(), weight)
    }

    #[test]
    fn weights_parse_as_comfyui_parses_them() {
        // Cases and results from ComfyUI's token_weights, run in Python.
        assert_eq!(w("(cat:1.3)"), [seg("cat", 1.3)]);
        assert_eq!(w("(cat)"), [seg("cat", 1.1)]);
        assert_eq!(w("((cat))"), [seg("cat", 1.21)]);
        assert_eq!(w("((cat):1.5)"), [seg("cat", 1.65)]);
        assert_eq!(w("((cat:1.5))"), [seg("cat", 1.5)]);
        assert_eq!(w("(a (b:0.5) c:2)"), [seg("a ", 2.0), seg("b", 0.5), seg(" c", 2.0)]);
        assert_eq!(w("[cat]"), [seg("[cat]", 1.0)]);
        assert_eq!(w("\\(cat\\)"), [seg("(cat)", 1.0)]);
        assert_eq!(w("(\\(cat\\):1.2)"), [seg("(cat)", 1.2)]);
        assert_eq!(w("a (b"), [seg("a ", 1.0), seg("(b", 1.0)]);
        assert_eq!(w("(a:b)"), [seg("a:b", 1.1)]);
        assert_eq!(w("(:1.2)"), [seg(":1.2", 1.1)]);
        assert_eq!(w("(cat:1.2:1.3)"), [seg("cat:1.2", 1.3)]);
        assert_eq!(w("()"), Vec::<(String, f64)>::new());
        assert_eq!(w("(x: 1_0 )"), [seg("x", 10.0)]);
    }

    #[test]
    fn embedding_words_split_after_whitespace_only() {
        assert_eq!(split_embeddings("photo embedding:two, cat"), ["photo ", "embedding:two, cat"]);
        assert_eq!(split_embeddings("embedding:a embedding:b"), ["embedding:a ", "embedding:b"]);
        assert_eq!(split_embeddings("photo,embedding:x"), ["photo,embedding:x"]);
    }
}
