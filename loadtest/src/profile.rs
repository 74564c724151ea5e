//! The read-heavy chat profile: who asks for what, how often.
//!
//! Each request draws a tenant from a Zipf distribution over the seeded
//! tenants (rank 1 the busiest), then one of its conversations from a Zipf
//! distribution over them, then a request kind from the mix.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use rand::Rng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand_distr::Zipf;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `GET /v1/conversations/{id}/items?limit=20`: the last page of a chat.
    Items,
    /// `GET /v1/conversations/{id}`.
    Conversation,
    /// `GET /v1/conversations?limit=20`: the tenant's chat list.
    List,
    /// `POST /v1/responses` streamed to its end.
    Turn,
    /// A background turn, cancelled at once.
    Cancel,
    /// A streamed turn dropped after its first delta and resumed.
    Resume,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Items,
        Kind::Conversation,
        Kind::List,
        Kind::Turn,
        Kind::Cancel,
        Kind::Resume,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Items => "items",
            Kind::Conversation => "conversation",
            Kind::List => "list",
            Kind::Turn => "turn",
            Kind::Cancel => "cancel",
            Kind::Resume => "resume",
        }
    }
}

/// The share of each kind, in percent.
#[derive(Debug, Clone)]
pub struct Mix(pub BTreeMap<Kind, f64>);

impl Mix {
    /// The default: OpenAI-like reads. Four in five requests are a chat's
    /// latest page, most of them cache hits; writes (turns, cancels,
    /// resumed turns) are 5%.
    pub const DEFAULT: &'static str = "items=80,conversation=9,list=6,turn=3,cancel=1,resume=1";

    /// Parses `items=80,conversation=9,…`; kinds left out get 0.
    pub fn parse(text: &str) -> Result<Mix> {
        let mut shares = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .with_context(|| format!("mix entry {part:?} is not kind=percent"))?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .with_context(|| format!("unknown request kind {name:?}"))?;
            let share: f64 = value.trim().parse().context("a mix share is a number")?;
            if !(share >= 0.0 && share.is_finite()) {
                bail!("mix share of {name} must be a non-negative number");
            }
            shares.insert(kind, share);
        }
        if shares.values().sum::<f64>() <= 0.0 {
            bail!("the mix has no requests");
        }
        Ok(Mix(shares))
    }

    pub fn percent(&self, kind: Kind) -> f64 {
        let total: f64 = self.0.values().sum();
        self.0.get(&kind).copied().unwrap_or(0.0) * 100.0 / total
    }
}

/// A seeded tenant: its key and its conversations, busiest first.
pub struct Tenant {
    pub authorization: String,
    pub conversations: Vec<String>,
    zipf: Zipf<f64>,
}

/// The key `loadtest/seed.sql` gives the tenant with this name.
pub fn tenant_key(name: &str) -> String {
    let digest = Sha256::digest(format!("turnpike-loadtest:{name}").as_bytes());
    format!("tp_{}", hex::encode(digest))
}

/// The data set and how requests are drawn from it.
pub struct Profile {
    pub tenants: Vec<Tenant>,
    /// The index of each tenant's first conversation in the whole data set.
    offsets: Vec<usize>,
    conversations: usize,
    pub mix: Mix,
    kinds: Vec<Kind>,
    weights: WeightedIndex<f64>,
    tenant_zipf: Zipf<f64>,
}

/// One request to make.
pub struct Draw<'a> {
    pub kind: Kind,
    pub tenant: &'a Tenant,
    pub conversation: &'a str,
}

impl Profile {
    /// Reads the seeded tenants and their conversations (from the primary,
    /// where seeding wrote them).
    /// `tenant_s` and `conversation_s` are the Zipf exponents of the
    /// tenants and of each tenant's conversations.
    pub async fn load(
        database_url: &str,
        mix: Mix,
        tenant_s: f64,
        conversation_s: f64,
    ) -> Result<Profile> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await
            .with_context(|| format!("connect to {database_url}"))?;
        let rows = sqlx::query(
            "SELECT u.name, array_agg(c.id ORDER BY c.id) AS conversations
             FROM users AS u JOIN conversations AS c ON c.user_id = u.id
             WHERE u.name LIKE 'loadtest-%' AND c.deleted_at IS NULL
             GROUP BY u.name ORDER BY u.name",
        )
        .fetch_all(&pool)
        .await?;
        pool.close().await;
        if rows.is_empty() {
            bail!("no seeded tenants: run loadtest/seed.sql first (make loadtest does)");
        }
        let mut tenants = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get("name")?;
            let ids: Vec<uuid::Uuid> = row.try_get("conversations")?;
            let conversations: Vec<String> = ids
                .into_iter()
                .map(|id| format!("conv_{}", id.simple()))
                .collect();
            tenants.push(Tenant {
                authorization: format!("Bearer {}", tenant_key(&name)),
                zipf: Zipf::new(conversations.len() as f64, conversation_s)?,
                conversations,
            });
        }
        let kinds: Vec<Kind> = mix.0.keys().copied().collect();
        let weights = WeightedIndex::new(mix.0.values().copied())?;
        let mut offsets = Vec::with_capacity(tenants.len());
        let mut conversations = 0;
        for tenant in &tenants {
            offsets.push(conversations);
            conversations += tenant.conversations.len();
        }
        Ok(Profile {
            offsets,
            conversations,
            tenant_zipf: Zipf::new(tenants.len() as f64, tenant_s)?,
            tenants,
            mix,
            kinds,
            weights,
        })
    }

    /// Reads go to a Zipf-drawn tenant's Zipf-drawn conversation. Writes go
    /// to a conversation drawn uniformly from all of them: were they as
    /// concentrated as the reads, the busiest conversations would grow by
    /// hundreds of turns a run, and each run's prompts (and costs) would
    /// be longer than the last.
    pub fn draw<R: Rng>(&self, rng: &mut R) -> Draw<'_> {
        let kind = self.kinds[self.weights.sample(rng)];
        if matches!(kind, Kind::Turn | Kind::Cancel | Kind::Resume) {
            let at = rng.random_range(0..self.conversations);
            let (tenant, conversation) = self.nth_conversation(at);
            return Draw {
                kind,
                tenant,
                conversation,
            };
        }
        // Zipf draws ranks from 1.
        let tenant =
            &self.tenants[(self.tenant_zipf.sample(rng) as usize - 1).min(self.tenants.len() - 1)];
        let conversation = &tenant.conversations
            [(tenant.zipf.sample(rng) as usize - 1).min(tenant.conversations.len() - 1)];
        Draw {
            kind,
            tenant,
            conversation,
        }
    }

    /// The `at`-th conversation of the data set, with its tenant.
    fn nth_conversation(&self, at: usize) -> (&Tenant, &str) {
        let index = self
            .offsets
            .partition_point(|&first| first <= at)
            .saturating_sub(1);
        let tenant = &self.tenants[index];
        let conversation =
            &tenant.conversations[(at - self.offsets[index]).min(tenant.conversations.len() - 1)];
        (tenant, conversation)
    }
}

/// What the streaming clients saw, checked event by event.
#[derive(Default)]
pub struct StreamTally {
    pub streams: AtomicU64,
    pub events: AtomicU64,
    /// Sequence numbers skipped (an event that never arrived).
    pub lost: AtomicU64,
    /// Sequence numbers seen twice or out of order.
    pub repeated: AtomicU64,
    /// Streams that ended without a terminal event.
    pub unfinished: AtomicU64,
    pub resumed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Cancels that found the turn already over (409).
    pub cancel_too_late: AtomicU64,
    /// Streams reopened after they broke.
    pub reconnects: AtomicU64,
    /// Completed streams whose text differs from the stored response's.
    pub mismatched: AtomicU64,
    /// HTTP requests made (an SSE stream counts once).
    pub requests: AtomicU64,
    /// Answers by method and status code (`GET 200`; status 0: no answer).
    pub statuses: std::sync::Mutex<BTreeMap<String, u64>>,
    /// The responses whose streams ended without a terminal event, with the
    /// last event seen, for a look at the stored state.
    pub unfinished_responses: std::sync::Mutex<Vec<(String, String)>>,
}

#[derive(Debug, Serialize)]
pub struct StreamSummary {
    pub streams: u64,
    pub events: u64,
    pub lost: u64,
    pub repeated: u64,
    pub unfinished: u64,
    pub resumed: u64,
    pub cancelled: u64,
    pub cancel_too_late: u64,
    pub reconnects: u64,
    pub mismatched: u64,
    pub requests: u64,
    pub statuses: BTreeMap<String, u64>,
    pub unfinished_responses: Vec<(String, String)>,
}

impl StreamTally {
    pub fn count_status(&self, method: &str, status: u16) {
        *self
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("{method} {status}"))
            .or_insert(0) += 1;
    }

    pub fn summary(&self) -> StreamSummary {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StreamSummary {
            streams: get(&self.streams),
            events: get(&self.events),
            lost: get(&self.lost),
            repeated: get(&self.repeated),
            unfinished: get(&self.unfinished),
            resumed: get(&self.resumed),
            cancelled: get(&self.cancelled),
            cancel_too_late: get(&self.cancel_too_late),
            reconnects: get(&self.reconnects),
            mismatched: get(&self.mismatched),
            requests: get(&self.requests),
            statuses: self
                .statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            unfinished_responses: self
                .unfinished_responses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Follows one stream's sequence numbers.
pub struct Sequence {
    next: Option<u64>,
    pub lost: u64,
    pub repeated: u64,
    pub events: u64,
}

impl Sequence {
    /// A stream that starts at sequence number 0, or right after `after`.
    pub fn starting_after(after: Option<u64>) -> Sequence {
        Sequence {
            next: Some(after.map_or(0, |a| a + 1)),
            lost: 0,
            repeated: 0,
            events: 0,
        }
    }

    /// The last sequence number seen in order, to resume after.
    pub fn last(&self) -> Option<u64> {
        self.next.and_then(|n| n.checked_sub(1))
    }

    pub fn see(&mut self, number: u64) {
        self.events += 1;
        match self.next {
            Some(next) if number == next => {}
            Some(next) if number > next => self.lost += number - next,
            _ => self.repeated += 1,
        }
        self.next = Some(self.next.map_or(number + 1, |n| n.max(number + 1)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mixes_parse_and_refuse_nonsense() {
        let mix = Mix::parse(Mix::DEFAULT).unwrap();
        assert!((mix.percent(Kind::Items) - 80.0).abs() < 1e-9);
        assert!(Mix::parse("items=1,teleport=2").is_err());
        assert!(Mix::parse("items=-1").is_err());
        assert!(Mix::parse("items=0").is_err());
    }

    #[test]
    fn sequences_count_gaps_and_repeats() {
        let mut seq = Sequence::starting_after(None);
        for n in [0, 1, 3, 3, 4] {
            seq.see(n);
        }
        assert_eq!((seq.lost, seq.repeated, seq.events), (1, 1, 5));
        let mut resumed = Sequence::starting_after(Some(4));
        resumed.see(5);
        assert_eq!((resumed.lost, resumed.repeated), (0, 0));
    }

    #[test]
    fn keys_match_the_seed() {
        // sha256('turnpike-loadtest:loadtest-000000'), as seed.sql computes it.
        let key = tenant_key("loadtest-000000");
        assert!(key.starts_with("tp_") && key.len() == 67);
    }
}
