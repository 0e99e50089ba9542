//! The evaluation table of a run (learned encoder, the same encoder untrained, raw pixels) and
//! its text and JSON forms.

use serde_json::{json, Value};

use super::eval::EvalScores;

/// The evaluation protocol applied to three representations of the same images.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTable {
    /// The trained encoder's backbone features.
    pub encoder: EvalScores,
    /// The same architecture with its initial (seeded) weights.
    pub untrained: EvalScores,
    /// The pixels themselves.
    pub raw_pixels: EvalScores,
    /// Seconds the three evaluations took.
    pub seconds: f64,
}

/// One row of the table as JSON: every score a fraction in [0, 1]; the 10-labels-per-class
/// scores are the mean over the seeds, with `_std` (population) and `_values` next to them.
pub fn scores_json(s: &EvalScores) -> Value {
    json!({
        "knn1": s.knn1,
        "knn5": s.knn5,
        "probe_full": s.probe_full,
        "probe_10_per_class": s.probe_10_per_class.mean,
        "probe_10_per_class_std": s.probe_10_per_class.std,
        "probe_10_per_class_values": s.probe_10_per_class.values,
        "knn1_10_per_class": s.knn1_10_per_class.mean,
        "knn1_10_per_class_std": s.knn1_10_per_class.std,
    })
}

impl EvalTable {
    pub fn rows(&self) -> [(&'static str, &EvalScores); 3] {
        [
            ("encoder", &self.encoder),
            ("untrained", &self.untrained),
            ("raw pixels", &self.raw_pixels),
        ]
    }

    /// `{"encoder": ..., "untrained": ..., "raw_pixels": ...}`, see [`scores_json`].
    pub fn to_json(&self) -> Value {
        json!({
            "encoder": scores_json(&self.encoder),
            "untrained": scores_json(&self.untrained),
            "raw_pixels": scores_json(&self.raw_pixels),
            "seconds": self.seconds,
        })
    }

    /// The table as printed at the end of `contra train` and by `contra eval`.
    pub fn format(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{:<12} {:>7} {:>7} {:>11} {:>20}\n",
            "", "knn1", "knn5", "probe_full", "probe_10_per_class"
        ));
        for (name, r) in self.rows() {
            s.push_str(&format!(
                "{:<12} {:>7.4} {:>7.4} {:>11.4} {:>11.4} ± {:.4}\n",
                name,
                r.knn1,
                r.knn5,
                r.probe_full,
                r.probe_10_per_class.mean,
                r.probe_10_per_class.std
            ));
        }
        s
    }
}
