//! Which (layer, expert) pairs a worker hosts: `all`; `shard:I/N` (expert e of every MoE layer
//! where e mod N = I); or a list such as `0:0-3,1:4,*:7` (layer:experts, `*` for every MoE layer,
//! experts as single ids or inclusive ranges).

use crate::error::{Result, WorkerError};
use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertSpec {
    All,
    Shard { index: usize, count: usize },
    List(Vec<(Option<usize>, usize, usize)>),
}

impl std::str::FromStr for ExpertSpec {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self> {
        let err = |message: String| WorkerError::Spec { spec: s.to_string(), message };
        let t = s.trim();
        if t == "all" {
            return Ok(ExpertSpec::All);
        }
        if let Some(rest) = t.strip_prefix("shard:") {
            let (i, n) = rest.split_once('/').ok_or_else(|| err("expected shard:I/N".into()))?;
            let index: usize = i.trim().parse().map_err(|_| err(format!("shard index {i:?} is not a number")))?;
            let count: usize = n.trim().parse().map_err(|_| err(format!("shard count {n:?} is not a number")))?;
            if count == 0 || index >= count {
                return Err(err(format!("shard index {index} must be below the shard count {count}")));
            }
            return Ok(ExpertSpec::Shard { index, count });
        }
        let mut items = Vec::new();
        for part in t.split(',') {
            let (layer, experts) = part
                .split_once(':')
                .ok_or_else(|| err(format!("{part:?} is not layer:experts (e.g. 0:0-3 or *:7)")))?;
            let layer = match layer.trim() {
                "*" => None,
                l => Some(l.parse().map_err(|_| err(format!("layer {l:?} is not a number or *")))?),
            };
            let (a, b) = match experts.split_once('-') {
                Some((a, b)) => (a, b),
                None => (experts, experts),
            };
            let lo: usize = a.trim().parse().map_err(|_| err(format!("expert {a:?} is not a number")))?;
            let hi: usize = b.trim().parse().map_err(|_| err(format!("expert {b:?} is not a number")))?;
            if hi < lo {
                return Err(err(format!("expert range {lo}-{hi} is empty")));
            }
            items.push((layer, lo, hi));
        }
        Ok(ExpertSpec::List(items))
    }
}

impl ExpertSpec {
    /// The hosted (layer, expert) pairs among `moe_layers`, checked against the model's sizes.
    pub fn resolve(
        &self,
        moe_layers: &[usize],
        num_layers: usize,
        num_experts: usize,
    ) -> Result<BTreeSet<(usize, usize)>> {
        let mut out = BTreeSet::new();
        match self {
            ExpertSpec::All => {
                for &l in moe_layers {
                    out.extend((0..num_experts).map(|e| (l, e)));
                }
            }
            ExpertSpec::Shard { index, count } => {
                for &l in moe_layers {
                    out.extend((0..num_experts).filter(|e| e % count == *index).map(|e| (l, e)));
                }
            }
            ExpertSpec::List(items) => {
                for &(layer, lo, hi) in items {
                    let spec = format!("{self:?}");
                    if hi >= num_experts {
                        return Err(WorkerError::Spec {
                            spec,
                            message: format!("expert {hi} is out of range: the model has {num_experts} experts"),
                        });
                    }
                    let layers: Vec<usize> = match layer {
                        None => moe_layers.to_vec(),
                        Some(l) if l >= num_layers => {
                            return Err(WorkerError::Spec {
                                spec,
                                message: format!("layer {l} is out of range: the model has {num_layers} layers"),
                            })
                        }
                        Some(l) if !moe_layers.contains(&l) => {
                            return Err(WorkerError::Spec {
                                spec,
                                message: format!("layer {l} has no experts (a dense layer)"),
                            })
                        }
                        Some(l) => vec![l],
                    };
                    for l in layers {
                        out.extend((lo..=hi).map(|e| (l, e)));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let layers = [0, 1, 2];
        let all: ExpertSpec = "all".parse().unwrap();
        assert_eq!(all.resolve(&layers, 3, 4).unwrap().len(), 12);
        let shard: ExpertSpec = "shard:1/2".parse().unwrap();
        assert!(shard.resolve(&layers, 3, 4).unwrap().iter().all(|&(_, e)| e % 2 == 1));
        let list: ExpertSpec = "0:0-2,1:3,*:1".parse().unwrap();
        let set = list.resolve(&layers, 3, 4).unwrap();
        assert_eq!(set, [(0, 0), (0, 1), (0, 2), (1, 1), (1, 3), (2, 1)].into_iter().collect());
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        assert!("shard:2/2".parse::<ExpertSpec>().unwrap_err().to_string().contains("below the shard count"));
        assert!("0-3".parse::<ExpertSpec>().unwrap_err().to_string().contains("layer:experts"));
        let e = "0:9".parse::<ExpertSpec>().unwrap().resolve(&[0], 1, 4).unwrap_err().to_string();
        assert!(e.contains("expert 9 is out of range"), "{e}");
        let e = "5:0".parse::<ExpertSpec>().unwrap().resolve(&[0], 2, 4).unwrap_err().to_string();
        assert!(e.contains("layer 5"), "{e}");
    }
}
