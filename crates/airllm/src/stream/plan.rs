//! The memory plan: from the budget and the model's sizes, how many layers stay resident, how
//! many are streamed, and whether the output head fits whole.

use std::fmt;

use crate::error::{Error, Result};
use crate::util::fmt_bytes;

/// Sizes the plan is made from. All "bytes" are in compute form unless named `file`.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub num_layers: usize,
    pub layer_bytes: u64,
    pub layer_file_bytes: u64,
    pub vocab: usize,
    /// The whole output head in compute form.
    pub head_bytes: u64,
    /// Bytes one vocabulary row of the head takes while a chunk is read and used.
    pub head_row_bytes: u64,
    pub head_file_bytes: u64,
    /// KV caches of all sequences at full context.
    pub kv_bytes: u64,
    /// Activations and logits for the largest step.
    pub work_bytes: u64,
    /// Always-resident small tensors (final norm, rope tables).
    pub fixed_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub budget: u64,
    pub resident_layers: usize,
    pub streamed_layers: usize,
    pub head_resident: bool,
    /// Vocabulary rows per output-head chunk when the head is streamed.
    pub head_chunk_rows: usize,
    pub head_chunk_bytes: u64,
    pub layer_bytes: u64,
    pub inflight_bytes: u64,
    pub kv_bytes: u64,
    pub work_bytes: u64,
    pub fixed_bytes: u64,
    /// The smallest budget that can run this model at this batch and context.
    pub minimum: u64,
    pub bytes_read_per_token: u64,
}

impl Plan {
    pub fn new(inp: &PlanInput, budget: u64) -> Result<Plan> {
        let head_bytes = inp.head_bytes;
        // A head chunk is about a quarter of a layer, and never the whole head.
        let chunk_rows = ((inp.layer_bytes / 4) / inp.head_row_bytes.max(1))
            .clamp(1, inp.vocab.max(1) as u64) as usize;
        let head_chunk_bytes = chunk_rows as u64 * inp.head_row_bytes;
        let base = inp.kv_bytes + inp.work_bytes + inp.fixed_bytes;
        let all_resident = inp.num_layers as u64 * inp.layer_bytes + head_bytes + base;
        let make = |resident: usize, head_resident: bool, inflight: u64, minimum: u64| {
            let streamed = inp.num_layers - resident;
            Plan {
                budget,
                resident_layers: resident,
                streamed_layers: streamed,
                head_resident,
                head_chunk_rows: if head_resident { inp.vocab } else { chunk_rows },
                head_chunk_bytes: if head_resident { 0 } else { head_chunk_bytes },
                layer_bytes: inp.layer_bytes,
                inflight_bytes: inflight,
                kv_bytes: inp.kv_bytes,
                work_bytes: inp.work_bytes,
                fixed_bytes: inp.fixed_bytes,
                minimum,
                bytes_read_per_token: streamed as u64 * inp.layer_file_bytes
                    + if head_resident {
                        0
                    } else {
                        inp.head_file_bytes
                    },
            }
        };
        // Streaming needs the layer being computed and the one being read, plus a head chunk.
        let inflight = 2 * inp.layer_bytes;
        let minimum = (inflight + base + head_chunk_bytes).min(all_resident);
        if all_resident <= budget {
            return Ok(make(inp.num_layers, true, 0, minimum));
        }
        if budget < minimum {
            return Err(Error::BudgetTooSmall {
                budget,
                minimum,
                detail: format!(
                    "2 layers in flight {} + KV cache {} + working set {} + head chunk {}",
                    fmt_bytes(inflight),
                    fmt_bytes(inp.kv_bytes),
                    fmt_bytes(inp.work_bytes + inp.fixed_bytes),
                    fmt_bytes(head_chunk_bytes)
                ),
            });
        }
        // Layers first: each resident byte saves one byte read per token whichever it holds,
        // and layers are read from the start of the sweep, where prefetch cannot hide them.
        let spare = budget - minimum;
        let resident = ((spare / inp.layer_bytes.max(1)) as usize).min(inp.num_layers - 1);
        let left = spare - resident as u64 * inp.layer_bytes;
        let head_resident = left + head_chunk_bytes >= head_bytes;
        let mut plan = make(resident, head_resident, inflight, minimum);
        if head_resident {
            plan.head_chunk_bytes = 0;
        }
        Ok(plan)
    }

    /// Bytes the plan holds at most.
    pub fn total_bytes(&self, head_bytes: u64) -> u64 {
        self.resident_layers as u64 * self.layer_bytes
            + self.inflight_bytes
            + self.kv_bytes
            + self.work_bytes
            + self.fixed_bytes
            + if self.head_resident {
                head_bytes
            } else {
                self.head_chunk_bytes
            }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan: budget {}, minimum {}",
            fmt_bytes(self.budget),
            fmt_bytes(self.minimum)
        )?;
        writeln!(
            f,
            "  layers: {} resident, {} streamed ({} each in compute form)",
            self.resident_layers,
            self.streamed_layers,
            fmt_bytes(self.layer_bytes)
        )?;
        writeln!(
            f,
            "  output head: {}",
            if self.head_resident {
                "resident".to_string()
            } else {
                format!(
                    "streamed in chunks of {} rows ({})",
                    self.head_chunk_rows,
                    fmt_bytes(self.head_chunk_bytes)
                )
            }
        )?;
        writeln!(
            f,
            "  KV cache {}, working set {}, in-flight layer buffers {}",
            fmt_bytes(self.kv_bytes),
            fmt_bytes(self.work_bytes + self.fixed_bytes),
            fmt_bytes(self.inflight_bytes)
        )?;
        write!(
            f,
            "  bytes read per token: {}",
            fmt_bytes(self.bytes_read_per_token)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PlanInput {
        PlanInput {
            num_layers: 10,
            layer_bytes: 1000,
            layer_file_bytes: 500,
            vocab: 100,
            head_bytes: 4000,
            head_row_bytes: 40,
            head_file_bytes: 2000,
            kv_bytes: 300,
            work_bytes: 200,
            fixed_bytes: 0,
        }
    }

    #[test]
    fn refuses_below_minimum_and_states_it() {
        let e = Plan::new(&input(), 1000).unwrap_err().to_string();
        assert!(e.contains("minimum"), "{e}");
    }

    #[test]
    fn more_budget_more_resident() {
        let inp = input();
        let small = Plan::new(&inp, 3000).unwrap();
        let large = Plan::new(&inp, 8000).unwrap();
        assert!(small.resident_layers < large.resident_layers);
        assert_eq!(small.resident_layers + small.streamed_layers, 10);
        assert!(large.bytes_read_per_token < small.bytes_read_per_token);
        assert!(small.total_bytes(4000) <= 3000 && large.total_bytes(4000) <= 8000);
        let all = Plan::new(&inp, 100_000).unwrap();
        assert_eq!(
            (
                all.streamed_layers,
                all.head_resident,
                all.bytes_read_per_token
            ),
            (0, true, 0)
        );
    }
}
