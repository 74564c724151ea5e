//! The agent loop's durable state. Each completed step of a turn (one model
//! call's output, one batch of tool outputs, one compaction) is stored on the
//! primary keyed by (response, step) before the loop goes on, so a turn
//! redelivered after its worker died resumes after the last stored step: the
//! model is not asked again and no tool runs twice. A conversation also keeps
//! the instructions and tools its prompts are frozen on.

use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use turnpike_protocol::item::Item;
use turnpike_protocol::response::Usage;
use uuid::Uuid;

use crate::db::DbConn;
use crate::db::statement::{self, Arg};

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A model call; `items` is its output.
    Model,
    /// Server-side tool calls ran; `items` are their outputs, in call order.
    Tools,
    /// The context was compacted; `items` holds the compaction item and
    /// `prompt` the input that replaces everything before it.
    Compaction,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Tools => "tools",
            Self::Compaction => "compaction",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "tools" => Self::Tools,
            "compaction" => Self::Compaction,
            _ => Self::Model,
        }
    }
}

/// One stored step.
#[derive(Debug, Clone)]
pub struct Step {
    pub index: i64,
    pub kind: StepKind,
    pub items: Vec<Item>,
    pub usage: Option<Usage>,
    /// A compaction step: the prompt window it stands for. A model step:
    /// its output items exactly as the provider sent them (what goes back
    /// to the provider), one per item.
    pub prompt: Option<Vec<serde_json::Value>>,
}

type StepTuple = (
    i64,
    String,
    SqlJson<Vec<Item>>,
    Option<SqlJson<Usage>>,
    Option<SqlJson<Vec<serde_json::Value>>>,
);

/// A turn's stored steps, in order. Primary only (they were just written).
#[tracing::instrument(level = "debug", skip(db))]
pub async fn load(db: &mut impl DbConn, response: Uuid) -> Result<Vec<Step>, sqlx::Error> {
    let prepared = db.prepared();
    let rows: Vec<StepTuple> = sqlx::query_as(
        "SELECT step, kind, items, usage, prompt FROM response_steps WHERE response_id = $1 ORDER BY step",
    )
    .bind(response)
    .persistent(prepared)
    .fetch_all(db.conn())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(index, kind, items, usage, prompt)| Step {
            index,
            kind: StepKind::parse(&kind),
            items: items.0,
            usage: usage.map(|u| u.0),
            prompt: prompt.map(|p| p.0),
        })
        .collect())
}

/// Stores a completed step. False when that step was already stored (a
/// second worker raced this one on a redelivered turn): the caller must stop.
/// Primary only.
#[tracing::instrument(level = "debug", skip(db, step), fields(index = step.index))]
pub async fn save(db: &mut impl DbConn, response: Uuid, step: &Step) -> Result<bool, sqlx::Error> {
    let items = statement::json(&step.items)?;
    let usage = step.usage.as_ref().map(statement::json).transpose()?;
    let prompt = step.prompt.as_ref().map(statement::json).transpose()?;
    let done = statement::execute(
        db,
        "INSERT INTO response_steps (response_id, step, kind, items, usage, prompt)
         VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb) ON CONFLICT DO NOTHING",
        &[
            Arg::from(response),
            Arg::from(step.index),
            Arg::from(step.kind.as_str()),
            Arg::from(items.as_str()),
            Arg::Text(usage.as_deref()),
            Arg::Text(prompt.as_deref()),
        ],
    )
    .await?;
    Ok(done == 1)
}

/// The instructions and tools a conversation's prompts are built on. The
/// first turn sets them; later turns never edit them (that would break the
/// prompt prefix every provider caches on): new tools are appended, and
/// changes are told to the model in a developer message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Frozen {
    /// The instructions of the first turn, sent as `instructions` on every turn.
    pub instructions: Option<String>,
    /// The latest instructions a turn asked for (a change adds a developer message).
    #[serde(default)]
    pub current_instructions: Option<String>,
    /// Every tool any turn offered, in the order they were first offered
    /// (each turn's new tools sorted by name): the prompt's `tools`.
    #[serde(default)]
    pub tools: Vec<serde_json::Value>,
    /// The names of the tools the latest turn offered (a change adds a developer message).
    #[serde(default)]
    pub current_tools: Vec<String>,
}

/// Stores the conversation's frozen prompt settings. Primary only.
#[tracing::instrument(level = "debug", skip(db, frozen))]
pub async fn freeze(
    db: &mut impl DbConn,
    conversation: Uuid,
    frozen: &Frozen,
) -> Result<(), sqlx::Error> {
    let frozen = statement::json(frozen)?;
    statement::execute(
        db,
        "UPDATE conversations SET frozen = $2::jsonb WHERE id = $1",
        &[Arg::from(conversation), Arg::from(frozen.as_str())],
    )
    .await?;
    Ok(())
}
