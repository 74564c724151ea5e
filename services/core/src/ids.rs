//! Public ids: `<prefix>_<32 hex>` around the row's UUIDv7.

use turnpike_protocol::ids;
use uuid::Uuid;

pub fn encode(prefix: &str, id: Uuid) -> String {
    format!("{prefix}_{}", id.simple())
}

/// Parses an id with the given prefix.
pub fn parse(prefix: &str, text: &str) -> Option<Uuid> {
    let hex = text.strip_prefix(prefix)?.strip_prefix('_')?;
    if hex.len() != 32 {
        return None;
    }
    Uuid::try_parse(hex).ok()
}

/// The prefix an item of this kind gets.
pub fn item_prefix(kind: &str) -> &'static str {
    match kind {
        "function_call" => ids::FUNCTION_CALL,
        "function_call_output" => ids::FUNCTION_CALL_OUTPUT,
        "reasoning" => ids::REASONING,
        "compaction" => ids::COMPACTION,
        "message" => ids::MESSAGE,
        _ => ids::OTHER_ITEM,
    }
}

/// Parses an item id of any item kind.
pub fn parse_item(text: &str) -> Option<Uuid> {
    [
        ids::MESSAGE,
        ids::FUNCTION_CALL,
        ids::FUNCTION_CALL_OUTPUT,
        ids::REASONING,
        ids::COMPACTION,
        ids::OTHER_ITEM,
    ]
    .iter()
    .find_map(|prefix| parse(prefix, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_other_prefixes() {
        let id = Uuid::now_v7();
        let text = encode("conv", id);
        assert!(text.starts_with("conv_") && text.len() == 37);
        assert_eq!(parse("conv", &text), Some(id));
        assert_eq!(parse("resp", &text), None);
        assert_eq!(parse("conv", "conv_123"), None);
        assert_eq!(parse("conv", "conv_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"), None);
        assert_eq!(parse_item(&encode("fc", id)), Some(id));
    }
}
