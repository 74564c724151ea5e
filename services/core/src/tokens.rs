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
    let Some(bpe) = encoding() else {
        return text.len().div_ceil(4) as u64;
    };
    // In pieces: the encoder's regex recurses along long runs of one
    // character and overflows its stack on a megabyte of them. A piece
    // boundary splits at most one token.
    let mut count = 0u64;
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(TOKENIZE_PIECE);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        // Prefer to cut after whitespace, where tokens end anyway.
        if end < rest.len()
            && let Some(space) = rest[..end].rfind(char::is_whitespace)
            && space > end / 2
        {
            // After the whole whitespace character (U+0085 and U+00A0
            // are two bytes, U+3000 three).
            end = space + rest[space..].chars().next().map_or(1, char::len_utf8);
        }
        count += bpe.encode_ordinary(&rest[..end]).len() as u64;
        rest = &rest[end..];
    }
    count
}

/// The most bytes tokenized at once.
const TOKENIZE_PIECE: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_megabyte_of_one_character_is_counted() {
        let count = count_text(&"y".repeat(1_572_864));
        assert!(count > 1_000, "{count}");
    }

    #[test]
    fn pieces_end_after_whole_multibyte_whitespace() {
        // Multibyte whitespace wherever a piece may end: no cut inside one.
        for space in ["\u{85}", "\u{a0}", "\u{3000}"] {
            for pad in 0..4 {
                let text = format!("{}{}", "é".repeat(pad), format!("word{space}").repeat(400));
                assert!(count_text(&text) > 100);
            }
        }
    }

    #[test]
    fn counts_grow_with_text() {
        let short = count_text("hello world");
        let long = count_text(&"hello world ".repeat(100));
        assert!((2..=3).contains(&short), "{short}");
        assert!(long > 150, "{long}");
    }
}
