//! Token estimates for prompts the provider has not measured yet, with
//! OpenAI's `o200k_base` encoding (tiktoken), counted over the prompt's JSON
//! text (a slight overestimate: keys and punctuation count too, which errs
//! on the side of compacting early). The provider's own usage wins wherever
//! it exists; this only covers what was appended since.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

fn encoding() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| match tiktoken_rs::o200k_base() {
        Ok(bpe) => Some(bpe),
        Err(e) => {
            tracing::warn!(error = %e, "cannot load the o200k_base encoding; estimating 4 bytes a token");
            None
        }
    })
    .as_ref()
}

/// Tokens in `text`.
pub fn count_text(text: &str) -> u64 {
    match encoding() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => text.len().div_ceil(4) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_grow_with_text() {
        let short = count_text("hello world");
        let long = count_text(&"hello world ".repeat(100));
        assert!((2..=3).contains(&short), "{short}");
        assert!(long > 150, "{long}");
    }
}
