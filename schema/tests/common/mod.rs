//! The `TrainingProgress`-like schema shared by the schema tests.

use std::collections::BTreeMap;

use colony_schema::{Checked, OwnerKey};
use serde::{Deserialize, Serialize};
use validator::Validate;

/// One peer's progress report, as the collaborative optimizer publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Validate)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrainingProgress {
    pub(crate) step: u64,
    #[validate(range(min = 0))]
    pub(crate) samples_accumulated: i64,
    #[validate(range(min = 0.0))]
    pub(crate) samples_per_second: f64,
    pub(crate) time: f64,
    pub(crate) client_mode: bool,
}

/// `{prefix}_progress`: a dictionary of reports keyed by their owner.
#[derive(Debug, Default, Serialize, Deserialize, Validate)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TrainingProgressSchema {
    pub(crate) progress: BTreeMap<OwnerKey, Option<Checked<TrainingProgress>>>,
}
