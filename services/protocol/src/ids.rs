//! Public id prefixes. An id on the wire is `<prefix>_<32 hex digits>`, the
//! hex being the row's UUIDv7, so ids sort by creation time like OpenAI's.

/// Conversation ids: `conv_…`.
pub const CONVERSATION: &str = "conv";
/// Message items: `msg_…`.
pub const MESSAGE: &str = "msg";
/// Function call items: `fc_…`.
pub const FUNCTION_CALL: &str = "fc";
/// Function call output items: `fco_…`.
pub const FUNCTION_CALL_OUTPUT: &str = "fco";
/// Reasoning items: `rs_…`.
pub const REASONING: &str = "rs";
/// Compaction items: `cmp_…`.
pub const COMPACTION: &str = "cmp";
/// Items of the kinds Turnpike keeps verbatim (hosted tool calls, custom,
/// shell and patch calls and their outputs, …): `item_…`.
pub const OTHER_ITEM: &str = "item";
/// Responses (turns): `resp_…`.
pub const RESPONSE: &str = "resp";
