//! The sequence store: every row the engine decodes is a sequence with its own key/value cache.
//!
//! A sequence's cache is a list of frozen, reference-counted blocks (shared with the sequences it
//! was forked from or into) followed by a private, growable tail. `fork` freezes the parent's tail
//! into a block that both parent and child then point at, so a child never copies or recomputes
//! its prefix; `free` drops a sequence and, with it, whatever blocks nobody else holds.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub type SeqId = u64;

/// Keys and values of one layer, `[kv_heads, len, head_dim]` each.
#[derive(Debug, Clone)]
pub struct KvPiece {
    pub k: Tensor,
    pub v: Tensor,
}

/// One layer of a sequence's cache as [`SeqStore::layer_parts`] finds it.
pub(crate) struct LayerParts<'a> {
    pub blocks: Vec<&'a KvPiece>,
    pub tail_k: &'a Tensor,
    pub tail_v: &'a Tensor,
}

/// A frozen run of positions, all layers.
#[derive(Debug)]
struct Block {
    layers: Vec<KvPiece>,
}

/// A preallocated, growable buffer `[kv_heads, capacity, head_dim]` per layer.
#[derive(Debug, Default)]
struct Tail {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    len: usize,
}

impl Tail {
    /// Buffers of `capacity` positions for every layer (see [`layer_buffers`]) that hold this
    /// tail's first `n` positions.
    fn copied(
        &self,
        shape: KvShape,
        capacity: usize,
        n: usize,
        device: &Device,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (ks, vs) = layer_buffers(shape, capacity, device)?;
        for (layer, (k, v)) in ks.iter().zip(&vs).enumerate() {
            copy_positions(&self.k[layer], k, n)?;
            copy_positions(&self.v[layer], v, n)?;
        }
        Ok((ks, vs))
    }
}

#[derive(Debug)]
struct Sequence {
    blocks: Vec<Arc<Block>>,
    tail: Tail,
    len: usize,
    trunk: Option<Trunk>,
}

/// Hidden states a sequence's rows kept as they entered one layer (see [`SeqStore::keep_trunk`]):
/// a verifier that shares the layers below with this sequence's rows enters there.
#[derive(Debug, Clone)]
struct Trunk {
    layer: usize,
    /// Position of the first kept state.
    start: usize,
    width: usize,
    /// `[positions, width]`, row-major.
    hidden: Vec<f32>,
    /// The token at each kept position: a reader checks it reads the same text.
    tokens: Vec<u32>,
}

impl Trunk {
    fn end(&self) -> usize {
        self.start + self.hidden.len() / self.width
    }
}

#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

pub struct SeqStore {
    shape: KvShape,
    device: Device,
    seqs: HashMap<SeqId, Sequence>,
    next_id: SeqId,
}

const MIN_TAIL_CAPACITY: usize = 64;
/// Forking copies a parent's private tail below this many positions and shares it above.
pub const FORK_COPY_LIMIT: usize = 16;

impl SeqStore {
    pub fn new(shape: KvShape, device: &Device) -> Self {
        Self {
            shape,
            device: device.clone(),
            seqs: HashMap::new(),
            next_id: 0,
        }
    }

    fn empty_tail(&self) -> Tail {
        Tail {
            k: vec![None; self.shape.layers],
            v: vec![None; self.shape.layers],
            len: 0,
        }
    }

    /// A new, empty sequence.
    pub fn create(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        let seq = Sequence {
            blocks: Vec::new(),
            tail: self.empty_tail(),
            len: 0,
            trunk: None,
        };
        self.seqs.insert(id, seq);
        id
    }

    fn get(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs
            .get(&id)
            .ok_or_else(|| Error::invalid(format!("sequence {id} does not exist (freed?)")))
    }

    fn get_mut(&mut self, id: SeqId) -> Result<&mut Sequence> {
        self.seqs
            .get_mut(&id)
            .ok_or_else(|| Error::invalid(format!("sequence {id} does not exist (freed?)")))
    }

    /// A child that shares every cached position of `parent`.
    ///
    /// A tail shorter than [`FORK_COPY_LIMIT`] is copied into the child instead of being frozen
    /// into a shared block: searches fork every few tokens, and blocks of one or two positions
    /// would make attention walk hundreds of pieces per row.
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let mut child_tail = self.empty_tail();
        let (shape, device) = (self.shape, self.device.clone());
        let seq = self.get_mut(parent)?;
        if seq.tail.len > 0 && seq.tail.len < FORK_COPY_LIMIT {
            let n = seq.tail.len;
            let (ks, vs) = seq.tail.copied(shape, MIN_TAIL_CAPACITY, n, &device)?;
            child_tail.k = ks.into_iter().map(Some).collect();
            child_tail.v = vs.into_iter().map(Some).collect();
            child_tail.len = n;
        } else if seq.tail.len > 0 {
            let n = seq.tail.len;
            // Copied into buffers of their own (one allocation for all layers' keys, one for
            // the values): the parent writes its next positions from offset 0 of its tail again.
            let (ks, vs) = seq.tail.copied(shape, n, n, &device)?;
            let layers = ks
                .into_iter()
                .zip(vs)
                .map(|(k, v)| KvPiece { k, v })
                .collect();
            seq.blocks.push(Arc::new(Block { layers }));
            seq.tail.len = 0;
        }
        let child = Sequence {
            blocks: seq.blocks.clone(),
            tail: child_tail,
            len: seq.len,
            trunk: seq.trunk.clone(),
        };
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, child);
        Ok(id)
    }

    /// Drops the last `n` positions of `id`, which must have been fed since its last fork (they
    /// are in its private tail): text appended to score it, taken back.
    pub fn truncate_tail(&mut self, id: SeqId, n: usize) -> Result<()> {
        let seq = self.get_mut(id)?;
        if n > seq.tail.len {
            return Err(Error::invalid(format!(
                "cannot take back {n} positions of sequence {id}: only {} were fed since its last \
                 fork",
                seq.tail.len
            )));
        }
        seq.tail.len -= n;
        seq.len -= n;
        let len = seq.len;
        if let Some(t) = &mut seq.trunk {
            if t.start >= len {
                seq.trunk = None;
            } else if t.end() > len {
                t.hidden.truncate((len - t.start) * t.width);
                t.tokens.truncate(len - t.start);
            }
        }
        Ok(())
    }

    /// Keeps the hidden states `hidden` (`[tokens, width]`) that `tokens` at positions
    /// `start..` of `id` had entering `layer`, after the ones already kept when they are
    /// contiguous with them (the kept states otherwise start again here).
    pub(crate) fn keep_trunk(
        &mut self,
        id: SeqId,
        layer: usize,
        start: usize,
        tokens: &[u32],
        hidden: &[f32],
    ) -> Result<()> {
        let width = hidden.len() / tokens.len().max(1);
        let seq = self.get_mut(id)?;
        match &mut seq.trunk {
            Some(t)
                if t.layer == layer && t.width == width && (t.start..=t.end()).contains(&start) =>
            {
                t.hidden.truncate((start - t.start) * width);
                t.tokens.truncate(start - t.start);
                t.hidden.extend_from_slice(hidden);
                t.tokens.extend_from_slice(tokens);
            }
            _ => {
                seq.trunk = Some(Trunk {
                    layer,
                    start,
                    width,
                    hidden: hidden.to_vec(),
                    tokens: tokens.to_vec(),
                })
            }
        }
        Ok(())
    }

    /// The hidden states that the longest leading run of `tokens`, read at positions `from..` of
    /// `id`, had entering `layer`, where they were kept (see [`Self::keep_trunk`]) for those same
    /// tokens: how many, and their states `[kept, width]`; `None` when none were.
    pub(crate) fn trunk(
        &self,
        id: SeqId,
        layer: usize,
        from: usize,
        tokens: &[u32],
    ) -> Option<(usize, Vec<f32>)> {
        let t = self.seqs.get(&id)?.trunk.as_ref()?;
        if t.layer != layer || from < t.start || from >= t.end() {
            return None;
        }
        let at = from - t.start;
        let kept = t.tokens[at..]
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        (kept > 0).then(|| (kept, t.hidden[at * t.width..(at + kept) * t.width].to_vec()))
    }

    /// Reserves `n` new positions of `dst` and fills them, on the layers below `layers`, with the
    /// keys and values of positions `from..from + n` of `src`: a verifier's sequence taking the
    /// lower layers of text the policy already read, where both compute the same (see
    /// [`crate::model::RowInput::entry`]). Returns where the positions start in `dst`'s tail.
    pub(crate) fn adopt_lower_layers(
        &mut self,
        dst: SeqId,
        src: SeqId,
        from: usize,
        n: usize,
        layers: usize,
    ) -> Result<usize> {
        if from + n > self.len(src)? {
            return Err(Error::invalid(format!(
                "sequence {src} has no cached positions {from}..{}",
                from + n
            )));
        }
        let start = self.reserve_all(dst, n)?;
        let source = self.get(src)?;
        let tail_len = source.tail.len;
        let dst_tail = &self.get(dst)?.tail;
        for layer in 0..layers.min(self.shape.layers) {
            let mut pieces: Vec<(&Tensor, &Tensor, usize)> = source
                .blocks
                .iter()
                .map(|b| {
                    let p = &b.layers[layer];
                    Ok((&p.k, &p.v, p.k.dim(1)?))
                })
                .collect::<Result<_>>()?;
            if let (Some(Some(k)), Some(Some(v))) =
                (source.tail.k.get(layer), source.tail.v.get(layer))
            {
                pieces.push((k, v, tail_len));
            }
            let (Some(Some(to_k)), Some(Some(to_v))) =
                (dst_tail.k.get(layer), dst_tail.v.get(layer))
            else {
                return Err(Error::invalid("the cache's tail has no room reserved"));
            };
            // Piece by piece, the part of each that overlaps the wanted positions.
            let mut at = 0;
            for (k, v, len) in pieces {
                let lo = from.max(at);
                let hi = (from + n).min(at + len);
                if lo < hi {
                    for (piece, to) in [(k, to_k), (v, to_v)] {
                        let part = piece.narrow(1, lo - at, hi - lo)?.contiguous()?;
                        to.slice_set(&part, 1, start + lo - from)?;
                    }
                }
                at += len;
            }
        }
        Ok(start)
    }

    pub fn free(&mut self, id: SeqId) {
        self.seqs.remove(&id);
    }

    /// Number of cached positions.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.get(id)?.len)
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Number of live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Bytes held by cache blocks and tails, counting each shared block once.
    pub fn bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        let piece_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        for seq in self.seqs.values() {
            for b in &seq.blocks {
                if seen.insert(Arc::as_ptr(b)) {
                    total += b
                        .layers
                        .iter()
                        .map(|p| piece_bytes(&p.k) + piece_bytes(&p.v))
                        .sum::<usize>();
                }
            }
            for t in seq.tail.k.iter().chain(&seq.tail.v).flatten() {
                total += piece_bytes(t);
            }
        }
        total
    }

    /// Writes `k` and `v` (`[kv_heads, n, head_dim]`, stored in the cache's dtype) after the
    /// sequence's cached positions on `layer` and returns its whole cache there, in the cache's
    /// dtype: shared blocks first, then the private tail.
    /// The positions count once [`Self::advance`] commits them.
    pub(crate) fn append_and_view(
        &mut self,
        id: SeqId,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Vec<KvPiece>> {
        let n = k.dim(1)?;
        let dtype = self.shape.dtype;
        let start = self.reserve_all(id, n)?;
        let parts = self.layer_parts(id, layer)?;
        parts
            .tail_k
            .slice_set(&k.to_dtype(dtype)?.contiguous()?, 1, start)?;
        parts
            .tail_v
            .slice_set(&v.to_dtype(dtype)?.contiguous()?, 1, start)?;
        let mut pieces: Vec<KvPiece> = parts.blocks.into_iter().cloned().collect();
        pieces.push(KvPiece {
            k: parts.tail_k.narrow(1, 0, start + n)?,
            v: parts.tail_v.narrow(1, 0, start + n)?,
        });
        Ok(pieces)
    }

    /// The sequence's cache on `layer` as stored, without new tensors: its shared blocks, oldest
    /// first, and its whole tail buffers (`[kv_heads, capacity, head_dim]`), whose leading
    /// positions up to the committed length plus any reserved ones are in use.
    pub(crate) fn layer_parts(&self, id: SeqId, layer: usize) -> Result<LayerParts<'_>> {
        let seq = self.get(id)?;
        let (Some(tail_k), Some(tail_v)) = (&seq.tail.k[layer], &seq.tail.v[layer]) else {
            return Err(Error::invalid("the cache's tail has no room reserved"));
        };
        Ok(LayerParts {
            blocks: seq.blocks.iter().map(|b| &b.layers[layer]).collect(),
            tail_k,
            tail_v,
        })
    }

    /// Makes room in the tail for `n` new positions on every layer (growing its buffers when
    /// they are full) and returns where they start; until [`Self::advance`] commits them, a
    /// second call for the same positions changes nothing. Growing takes one buffer for all
    /// layers' keys and one for their values (a fork would otherwise allocate and later free one
    /// per layer for each).
    pub(crate) fn reserve_all(&mut self, id: SeqId, n: usize) -> Result<usize> {
        let (shape, device) = (self.shape, self.device.clone());
        let seq = self.get_mut(id)?;
        let start = seq.tail.len;
        let needed = start + n;
        let capacity = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), |t| t.dim(1));
        let mut least = usize::MAX;
        for t in seq.tail.k.iter().chain(&seq.tail.v) {
            least = least.min(capacity(t)?);
        }
        if least < needed {
            let new_cap = needed.max(2 * least).max(MIN_TAIL_CAPACITY);
            let (ks, vs) = seq.tail.copied(shape, new_cap, start, &device)?;
            seq.tail.k = ks.into_iter().map(Some).collect();
            seq.tail.v = vs.into_iter().map(Some).collect();
        }
        Ok(start)
    }

    /// The pieces of a sequence's cache, the same on every layer: per shared block (oldest
    /// first) an identity that every sequence holding that block sees, and its length in
    /// positions. The private tail follows them as piece `blocks.len()` (see [`Self::piece`]).
    pub(crate) fn blocks(&self, id: SeqId) -> Result<Vec<(usize, usize)>> {
        self.get(id)?
            .blocks
            .iter()
            .map(|b| {
                let len = b.layers.first().map_or(Ok(0), |p| p.k.dim(1))?;
                Ok((Arc::as_ptr(b) as usize, len))
            })
            .collect()
    }

    /// Keys and values of piece `piece` of a sequence's cache on `layer`: one of its shared
    /// blocks, or (`piece == blocks`) its whole tail buffers, whose leading positions are in use.
    pub(crate) fn piece(
        &self,
        id: SeqId,
        layer: usize,
        piece: usize,
    ) -> Result<(&Tensor, &Tensor)> {
        let seq = self.get(id)?;
        if let Some(b) = seq.blocks.get(piece) {
            let p = b
                .layers
                .get(layer)
                .ok_or_else(|| Error::invalid(format!("no cache layer {layer}")))?;
            return Ok((&p.k, &p.v));
        }
        if piece > seq.blocks.len() {
            return Err(Error::invalid(format!("no cache piece {piece}")));
        }
        match (seq.tail.k.get(layer), seq.tail.v.get(layer)) {
            (Some(Some(k)), Some(Some(v))) => Ok((k, v)),
            _ => Err(Error::invalid("the cache's tail has no room reserved")),
        }
    }

    /// Commits `n` positions written by `append_and_view` on every layer.
    pub(crate) fn advance(&mut self, id: SeqId, n: usize) -> Result<()> {
        let seq = self.get_mut(id)?;
        seq.tail.len += n;
        seq.len += n;
        Ok(())
    }
}

/// A buffer for cache positions, left unset: every position is written (a new token's keys
/// and values, or a copy) before anything reads it, and reads never go past the positions in
/// use. Zeroing the ~25 kB of each layer's keys and values cost a beam search ~1% of its time,
/// as every step forks a beam's tail into new buffers.
fn tail_buffer<S: Into<candle_core::Shape>>(
    shape: S,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    // SAFETY: see above; the cache holds plain floats, valid for any bits once written.
    Ok(unsafe { Tensor::empty(shape, dtype, device)? })
}

/// Per layer, a `[kv_heads, capacity, head_dim]` key buffer and a value buffer, all views of
/// one allocation for the keys and one for the values.
fn layer_buffers(
    shape: KvShape,
    capacity: usize,
    device: &Device,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let dims = (shape.layers, shape.kv_heads, capacity, shape.head_dim);
    let views = || -> Result<Vec<Tensor>> {
        let all = tail_buffer(dims, shape.dtype, device)?;
        (0..shape.layers).map(|l| Ok(all.get(l)?)).collect()
    };
    Ok((views()?, views()?))
}

/// Copies the first `n` positions of every head of `from` (a tail buffer) into `to`.
fn copy_positions(from: &Option<Tensor>, to: &Tensor, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let from = from
        .as_ref()
        .ok_or_else(|| Error::invalid("tail buffer missing for a non-empty tail"))?;
    to.slice_set(&from.narrow(1, 0, n)?.contiguous()?, 1, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SeqStore {
        let shape = KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
            dtype: DType::F32,
        };
        SeqStore::new(shape, &Device::Cpu)
    }

    fn kv(n: usize, base: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * n * 4).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, (2, n, 4), &Device::Cpu).unwrap()
    }

    fn write(store: &mut SeqStore, id: SeqId, n: usize, base: f32) -> Vec<KvPiece> {
        let mut last = Vec::new();
        for layer in 0..2 {
            last = store
                .append_and_view(id, layer, &kv(n, base), &kv(n, -base))
                .unwrap();
        }
        store.advance(id, n).unwrap();
        last
    }

    fn flat(pieces: &[KvPiece]) -> Vec<f32> {
        let ks: Vec<Tensor> = pieces.iter().map(|p| p.k.clone()).collect();
        Tensor::cat(&ks, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn fork_shares_prefix_and_keeps_tails_private() {
        let mut s = store();
        let a = s.create();
        let n = FORK_COPY_LIMIT;
        write(&mut s, a, n, 0.0);
        let b = s.fork(a).unwrap();
        assert_eq!(s.len(b).unwrap(), n);
        let va = write(&mut s, a, 1, 100.0);
        let vb = write(&mut s, b, 1, 200.0);
        assert_eq!(va.len(), 2, "one shared block plus a private tail");
        assert_eq!(flat(&va[..1]), flat(&vb[..1]));
        assert_ne!(flat(&va[1..]), flat(&vb[1..]));
        // Both tails grew independently and the prefix block is stored once.
        let expected = kv(n, 0.0);
        let full_b = flat(&vb);
        let direct = Tensor::cat(&[expected, kv(1, 200.0)], 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(full_b, direct);
        s.free(a);
        assert!(s.len(a).is_err());
        assert_eq!(s.len(b).unwrap(), n + 1);
    }

    #[test]
    fn a_frozen_block_of_one_kv_head_does_not_alias_the_parents_tail() {
        // With one KV head a narrowed tail is already contiguous, so freezing it must still
        // copy: the parent writes its next positions from offset 0 of the same buffer.
        let mut s = SeqStore::new(
            KvShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 4,
                dtype: DType::F32,
            },
            &Device::Cpu,
        );
        let one = |n: usize, base: f32| {
            let data: Vec<f32> = (0..n * 4).map(|i| base + i as f32).collect();
            Tensor::from_vec(data, (1, n, 4), &Device::Cpu).unwrap()
        };
        let a = s.create();
        s.append_and_view(a, 0, &one(FORK_COPY_LIMIT, 0.0), &one(FORK_COPY_LIMIT, 0.0))
            .unwrap();
        s.advance(a, FORK_COPY_LIMIT).unwrap();
        let b = s.fork(a).unwrap();
        s.append_and_view(a, 0, &one(1, 900.0), &one(1, 900.0))
            .unwrap();
        s.advance(a, 1).unwrap();
        let vb = s.append_and_view(b, 0, &one(1, 5.0), &one(1, 5.0)).unwrap();
        let want = Tensor::cat(&[one(FORK_COPY_LIMIT, 0.0), one(1, 5.0)], 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            flat(&vb),
            want,
            "the parent's new position overwrote the shared prefix"
        );
    }

    #[test]
    fn fork_copies_a_short_tail() {
        let mut s = store();
        let a = s.create();
        write(&mut s, a, 3, 0.0);
        let b = s.fork(a).unwrap();
        let va = write(&mut s, a, 1, 100.0);
        let vb = write(&mut s, b, 1, 200.0);
        assert_eq!(
            vb.len(),
            1,
            "no block: the child got its own copy of the tail"
        );
        assert_eq!(flat(&va)[..3 * 4], flat(&vb)[..3 * 4]);
        let direct = Tensor::cat(&[kv(3, 0.0), kv(1, 200.0)], 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(flat(&vb), direct);
        assert_eq!(s.len(b).unwrap(), 4);
    }

    #[test]
    fn tail_grows_past_initial_capacity() {
        let mut s = store();
        let a = s.create();
        for i in 0..(MIN_TAIL_CAPACITY + 5) {
            write(&mut s, a, 1, i as f32);
        }
        let view = write(&mut s, a, 2, 7.0);
        assert_eq!(view[0].k.dim(1).unwrap(), MIN_TAIL_CAPACITY + 7);
    }

    #[test]
    fn adopted_lower_layers_are_the_sources_positions() {
        let mut s = store();
        let a = s.create();
        write(&mut s, a, 20, 0.0);
        let _frozen = s.fork(a).unwrap();
        write(&mut s, a, 5, 100.0);
        let d = s.create();
        write(&mut s, d, 18, 7.0);
        // Positions 18..24 of `a`: two from its shared block, four from its tail.
        let start = s.adopt_lower_layers(d, a, 18, 6, 1).unwrap();
        assert_eq!(start, 18);
        let (k, v) = s.piece(d, 0, 0).unwrap();
        let got = |t: &Tensor| {
            t.narrow(1, 18, 6)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // Keys were written from `base`, values from `-base` (see `write`).
        let source = |block: f32, tail: f32| {
            let parts = [
                kv(20, block).narrow(1, 18, 2).unwrap(),
                kv(5, tail).narrow(1, 0, 4).unwrap(),
            ];
            let all = Tensor::cat(&parts, 1).unwrap();
            all.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(got(k), source(0.0, 100.0));
        assert_eq!(got(v), source(-0.0, -100.0));
        // The positions are reserved, not committed: the row that enters above writes the rest.
        assert_eq!(s.len(d).unwrap(), 18);
        assert!(
            s.adopt_lower_layers(d, a, 24, 2, 1).is_err(),
            "past the source's positions"
        );
    }

    #[test]
    fn kept_hidden_states_follow_their_tokens() {
        let mut s = store();
        let a = s.create();
        write(&mut s, a, 14, 0.0);
        let hidden: Vec<f32> = (0..6).map(|i| i as f32).collect();
        s.keep_trunk(a, 3, 10, &[1, 2, 3], &hidden).unwrap();
        assert_eq!(
            s.trunk(a, 3, 10, &[1, 2, 9]),
            Some((2, hidden[..4].to_vec()))
        );
        assert_eq!(
            s.trunk(a, 3, 11, &[2, 3, 4]),
            Some((2, hidden[2..].to_vec()))
        );
        assert_eq!(s.trunk(a, 2, 10, &[1]), None, "kept for another layer");
        assert_eq!(s.trunk(a, 3, 10, &[5]), None, "another text");
        assert_eq!(s.trunk(a, 3, 9, &[0, 1]), None, "before the kept positions");
        // Contiguous states extend the kept run; a fork keeps a copy.
        s.keep_trunk(a, 3, 13, &[4], &[6.0, 7.0]).unwrap();
        let b = s.fork(a).unwrap();
        assert_eq!(
            s.trunk(b, 3, 12, &[3, 4]),
            Some((2, vec![4.0, 5.0, 6.0, 7.0]))
        );
        // Positions taken back take their states with them.
        s.truncate_tail(a, 2).unwrap();
        assert_eq!(s.trunk(a, 3, 11, &[2, 3]), Some((1, vec![2.0, 3.0])));
        assert_eq!(s.trunk(b, 3, 13, &[4]), Some((1, vec![6.0, 7.0])));
    }
}
