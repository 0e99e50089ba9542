//! Finiteness checks that run on the device. An op on device-resident inputs does not copy them
//! to the host to look for NaN: a kernel lowers a status word to the first non-finite row of each
//! input it refuses and of each result that must be representable, and the words travel with
//! the op's results (after the loss's value in the loss's own buffer, so one copy reads both).
//! Reading a result ([`Tensor::to_vec`] and friends) turns a marked word into the error the host
//! check would have given, naming the op and the argument.

use std::sync::Arc;

use crate::kernels::status::{self, Terms, ALL_FINITE, LOSS_WORDS};
use crate::kernels::storage::DeviceBuf;
use crate::kernels::Backend;
use crate::{DType, Error, Indices, Result, Tensor};

/// Status words one op call can use (inputs, results and the loss).
const MAX_SLOTS: usize = 16;

/// What one status word watches.
#[derive(Debug)]
enum Slot {
    /// An input the op refuses when it holds a NaN or an infinity, kept to name the value
    /// (`None` for a tensor the op writes in place: keeping it would make the write copy it;
    /// its value is reported as NaN).
    Input {
        arg: &'static str,
        tensor: Option<Tensor>,
    },
    /// A result that must be representable; `blame` names what scales it.
    Result {
        what: &'static str,
        blame: &'static str,
    },
    /// Device-resident indices that must follow `rule`.
    Indices {
        arg: &'static str,
        indices: Indices,
        rule: IndexRule,
    },
}

/// What device-resident indices must satisfy: values in `lo..hi` (`range` says so in words),
/// and with `forbid_self` no value equal to its own position.
#[derive(Clone, Debug)]
pub(crate) struct IndexRule {
    pub lo: i64,
    pub hi: i64,
    pub forbid_self: bool,
    /// The host check's words for a value out of range, after `arg[i] = v`.
    pub range: String,
}

/// The checks of one op call, read with its results.
#[derive(Debug)]
pub(crate) struct Checks {
    op: &'static str,
    slots: Vec<Slot>,
    /// The buffer holding the status words, from word `offset` on.
    status: Arc<DeviceBuf>,
    offset: usize,
}

impl Checks {
    /// Whether the status words follow the values in `buf` (the loss's own buffer).
    pub fn lives_in(&self, buf: &Arc<DeviceBuf>) -> bool {
        Arc::ptr_eq(&self.status, buf)
    }

    /// An error when a status word reports a non-finite value. `words` are the status words
    /// when the caller already read them with the values; otherwise they are copied here.
    pub fn verify(&self, words: Option<&[u32]>) -> Result<()> {
        let downloaded;
        let words = match words {
            Some(words) => words,
            None => {
                downloaded = self.status.download_words()?;
                downloaded.get(self.offset..).unwrap_or_default()
            }
        };
        for (slot, &word) in self.slots.iter().zip(words) {
            if word == ALL_FINITE {
                continue;
            }
            let row = word as usize;
            return Err(match slot {
                Slot::Input {
                    arg,
                    tensor: Some(tensor),
                } => input_error(self.op, arg, tensor, row)?,
                Slot::Input { arg, tensor: None } => Error::NonFinite {
                    op: self.op,
                    arg,
                    row,
                    value: f64::NAN,
                },
                Slot::Result { what, blame } => Error::Overflow {
                    op: self.op,
                    what,
                    reason: format!("row {row} is not finite; {blame}"),
                },
                Slot::Indices { arg, indices, rule } => {
                    let value = indices.to_vec()?.get(row).copied().unwrap_or_default();
                    let reason = if rule.forbid_self && value == row as i64 {
                        format!("{arg}[{row}] = {value} is the masked self key")
                    } else {
                        format!("{arg}[{row}] = {value} {}", rule.range)
                    };
                    Error::invalid(self.op, arg, reason)
                }
            });
        }
        Ok(())
    }
}

/// The error for a marked row of an input, with the offending value (read only on this error
/// path): a NaN or an infinity, or an f64 beyond the f32 range the kernels read it in, which
/// is the error the host check gives before copying such a tensor in.
fn input_error(op: &'static str, arg: &'static str, t: &Tensor, row: usize) -> Result<Error> {
    let row_len = t.shape().iter().skip(1).product::<usize>().max(1);
    let values = t.to_vec_f64()?;
    let row_values = values.iter().skip(row * row_len).take(row_len).copied();
    if let Some(value) = row_values.clone().find(|v| !v.is_finite()) {
        return Ok(Error::NonFinite {
            op,
            arg,
            row,
            value,
        });
    }
    let value = row_values
        .into_iter()
        .find(|v| v.abs() > f32::MAX as f64)
        .unwrap_or(f64::NAN);
    Ok(Error::beyond_f32(arg, row, value))
}

/// Records the checks of one op call on a kernel backend and launches their scans.
pub(crate) struct Recorder<'b, B: Backend> {
    b: &'b B,
    op: &'static str,
    slots: Vec<Slot>,
    status: B::Buf,
}

impl<'b, B: Backend> Recorder<'b, B> {
    pub fn new(b: &'b B, op: &'static str) -> Result<Self> {
        Ok(Recorder {
            b,
            op,
            slots: Vec::new(),
            status: status::status_words(b, MAX_SLOTS)?,
        })
    }

    fn next_slot(&mut self, slot: Slot) -> Result<usize> {
        // One word stays free for the loss's own status.
        if self.slots.len() + 1 >= MAX_SLOTS {
            return Err(Error::Device(format!(
                "{}: more than {} status words in one call",
                self.op,
                MAX_SLOTS - 1
            )));
        }
        self.slots.push(slot);
        Ok(self.slots.len() - 1)
    }

    /// Scans `operand`, the kernel operand of input `t`, when `t` lives on the device (a host
    /// tensor was checked before it was copied in).
    pub fn input(&mut self, arg: &'static str, t: &Tensor, operand: &B::Buf) -> Result<()> {
        if t.device_buf().is_none() {
            return Ok(());
        }
        let row_len = t.shape().iter().skip(1).product();
        let slot = self.next_slot(Slot::Input {
            arg,
            tensor: Some(t.clone()),
        })?;
        status::scan(self.b, operand, row_len, &self.status, slot)
    }

    /// Checks the device-resident `indices` (their buffer `buf` on this backend) against `rule`.
    pub fn indices(
        &mut self,
        arg: &'static str,
        indices: &Indices,
        buf: &B::Buf,
        rule: IndexRule,
    ) -> Result<()> {
        let bounds = (rule.lo, rule.hi, rule.forbid_self);
        let slot = self.next_slot(Slot::Indices {
            arg,
            indices: indices.clone(),
            rule,
        })?;
        status::scan_indices(self.b, buf, bounds, &self.status, slot)
    }

    /// Scans `buf`, the device buffer of a tensor the op is about to write in place (rows of
    /// `row_len` elements), before the write.
    pub fn target(&mut self, arg: &'static str, buf: &B::Buf, row_len: usize) -> Result<()> {
        let slot = self.next_slot(Slot::Input { arg, tensor: None })?;
        status::scan(self.b, buf, row_len, &self.status, slot)
    }

    /// Scans the result `buf` (`row_len` elements per row), which must be finite.
    pub fn result(
        &mut self,
        what: &'static str,
        blame: &'static str,
        buf: &B::Buf,
        row_len: usize,
    ) -> Result<()> {
        let slot = self.next_slot(Slot::Result { what, blame })?;
        status::scan(self.b, buf, row_len, &self.status, slot)
    }

    /// Scans the device-resident result `t`, which must be finite.
    pub fn result_tensor(
        &mut self,
        what: &'static str,
        blame: &'static str,
        t: &Tensor,
    ) -> Result<()> {
        let buf = t
            .device_buf()
            .and_then(|buf| self.b.resident(buf))
            .ok_or_else(|| Error::Device(format!("{}: `{what}` is not on the device", self.op)))?;
        let row_len = t.shape().iter().skip(1).product();
        self.result(what, blame, buf, row_len)
    }

    /// The 0-d f64 loss `sum(row_loss) / divisor`, with every status word after it in its own
    /// buffer, and the checks to attach to the call's other results.
    pub fn finish_loss(
        self,
        row_loss: &B::Buf,
        divisor: f64,
        blame: &'static str,
    ) -> Result<(Tensor, Arc<Checks>)> {
        self.finish_scalar("loss", row_loss, divisor, blame)
    }

    /// The 0-d f64 result `what` = `sum(values) / divisor` (a loss, the gradient of a learnable
    /// scalar), with every status word after it, and the checks to attach to the other results.
    pub fn finish_scalar(
        self,
        what: &'static str,
        values: &B::Buf,
        divisor: f64,
        blame: &'static str,
    ) -> Result<(Tensor, Arc<Checks>)> {
        self.finish_terms(what, values, Terms::Values, divisor, blame)
    }

    /// [`Recorder::finish_scalar`] over the terms `terms` makes of `values`.
    pub fn finish_terms(
        self,
        what: &'static str,
        values: &B::Buf,
        terms: Terms<'_, B::Buf>,
        divisor: f64,
        blame: &'static str,
    ) -> Result<(Tensor, Arc<Checks>)> {
        let b = self.b;
        self.finish_with(what, blame, |status, slots| {
            status::finish_loss(b, values, terms, divisor, status, slots)
        })
    }

    /// The 0-d f64 result `what` written by `write(status, slots)`, a launch that lays out the
    /// result, the `slots` status words of `status` and the result's own status word as
    /// `status::finish_loss` does; and the checks to attach to the other results.
    pub fn finish_with(
        mut self,
        what: &'static str,
        blame: &'static str,
        write: impl FnOnce(&B::Buf, usize) -> Result<B::Buf>,
    ) -> Result<(Tensor, Arc<Checks>)> {
        let out = write(&self.status, self.slots.len())?;
        self.slots.push(Slot::Result { what, blame });
        let buf = Arc::new(self.b.adopt(out)?);
        let checks = Arc::new(Checks {
            op: self.op,
            slots: self.slots,
            status: buf.clone(),
            offset: LOSS_WORDS,
        });
        let loss = Tensor::from_device_buf_shared(Vec::new(), DType::F64, buf, checks.clone());
        Ok((loss, checks))
    }

    /// The checks to attach to the results of an op without a loss.
    pub fn finish(self) -> Result<Arc<Checks>> {
        Ok(Arc::new(Checks {
            op: self.op,
            slots: self.slots,
            status: Arc::new(self.b.adopt(self.status)?),
            offset: 0,
        }))
    }
}
