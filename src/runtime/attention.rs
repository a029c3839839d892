//! ONNX Runtime's fused attention: before a session is built, each attention of an exported graph
//! becomes one `com.microsoft.MultiHeadAttention` node (onnx-protobuf graph rewrite).
//!
//! The exported form (export/graphs.py `attention`, the pattern TensorRT fuses; docs/tensorrt.md) is
//! `Mul(Q, c)`, `Transpose(Mul(K, c), [0,1,3,2])`, `MatMul`, optionally `Add` of a mask bias
//! `Where(mask, 0, lowest)`, `Softmax(axis -1)`, `MatMul(., V)`, with Q/K/V `[B, N, S|T, H]` and
//! `c = sqrt(scale)`. ONNX Runtime's CPU provider would run that chain as it stands and materialise the
//! `[B, N, S, T]` scores several times over. Its MultiHeadAttention kernel streams them (flash
//! attention: memory linear in the tokens) when it has no mask; with a mask it still materialises the
//! probabilities once. So each attention becomes, by its mask:
//!
//! - none (the VAE's): MultiHeadAttention, flash;
//! - key padding, a mask `[B, 1, 1, T]` (the transformer's padded text): each batch row attends only its
//!   valid keys (gathered with `NonZero`), with no mask, so flash: a `Loop` over the rows, or for a batch
//!   of one (an `If`) the same nodes without the Loop's per-iteration copies. A padded query attends the
//!   same valid keys, which is what the mask computes; and a row computes the same alone or in a batch.
//!   A row without any valid key gives zeros (as torch's SDPA);
//! - any other mask `[B|1, 1, S, T]` (vision segments, the causal language model): MultiHeadAttention's
//!   3-D `key_padding_mask` (int32), not flash.
//!
//! Masked logits get `mask_filter_value` = `f32::MIN` added, as the exported bias does. An attention
//! that does not have exactly this form (or is not float32: the CPU kernel is float32 only) is left as
//! it is, with the reason in [`Summary::skipped`]; tests check that every attention of the committed
//! graphs is rewritten.

use std::collections::{HashMap, HashSet};

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

pub(super) const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;
const BFLOAT16: i32 = 16;
const INT32: i32 = 6;
pub(super) const INT64: i32 = 7;
const BOOL: i32 = 9;
pub(super) const MS_DOMAIN: &str = "com.microsoft";
/// Prefix of every name the rewrite adds.
const PREFIX: &str = "qe_attn";
/// A bias constant at or below this masks its logit: the exported bias is the dtype's lowest finite
/// value (float16: -65504), whose exp is 0 in every float type.
const MASKED: f32 = -6.0e4;

/// What the rewrite did to one graph.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Attentions without a mask: MultiHeadAttention, flash.
    pub flash: usize,
    /// Key-padding attentions run per batch row over the valid keys: flash (two MultiHeadAttention nodes
    /// each: the batch of one, and the Loop's body).
    pub per_row: usize,
    /// Attentions with any other mask: MultiHeadAttention with a 3-D key_padding_mask.
    pub masked: usize,
    /// Softmax nodes left as they were, each with the reason.
    pub skipped: Vec<String>,
}

impl Summary {
    /// Attentions rewritten.
    pub fn rewritten(&self) -> usize {
        self.flash + self.per_row + self.masked
    }
}

/// How an attention is masked.
#[derive(Clone, Debug, PartialEq)]
enum Mask {
    None,
    /// Bool `[B, 1, 1, T]`, true = attend.
    KeyPadding(String),
    /// Bool `[B|1, 1, S, T]`; `expand`: its batch is 1 while the queries' may not be.
    Full {
        cond: String,
        expand: bool,
    },
}

/// One attention of the exported form, found in the graph.
#[derive(Debug)]
struct Found {
    /// Indices of the nodes the MultiHeadAttention replaces (the last is the second MatMul).
    chain: Vec<usize>,
    q: String,
    k: String,
    v: String,
    scale: f32,
    heads: i64,
    mask: Mask,
    /// The second MatMul's output: `[B, N, S, Hv]`.
    output: String,
    /// The element type of Q.
    elem: i32,
}

/// The element type and dims (`None` = symbolic or unknown) of a tensor with a declared shape.
#[derive(Clone, Debug)]
pub(super) struct Shape {
    pub(super) elem: i32,
    pub(super) dims: Vec<Option<i64>>,
}

/// Look-ups over one graph.
pub(super) struct View<'a> {
    pub(super) g: &'a GraphProto,
    producer: HashMap<&'a str, usize>,
    /// Uses of each name by nodes, their subgraphs and the graph outputs.
    uses: HashMap<String, usize>,
    pub(super) shapes: HashMap<&'a str, Shape>,
    pub(super) initializers: HashMap<&'a str, &'a TensorProto>,
}

impl<'a> View<'a> {
    pub(super) fn new(g: &'a GraphProto) -> View<'a> {
        let mut producer = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(o.as_str(), i);
            }
        }
        let mut uses = HashMap::new();
        count_uses(g, &mut uses);
        for o in &g.output {
            *uses.entry(o.name.clone()).or_default() += 1;
        }
        let shapes =
            g.value_info.iter().chain(&g.input).chain(&g.output).filter_map(|v| Some((v.name.as_str(), shape(v)?))).collect();
        let initializers = g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        View { g, producer, uses, shapes, initializers }
    }

    fn node(&self, name: &str) -> Option<(usize, &'a NodeProto)> {
        self.producer.get(name).map(|&i| (i, &self.g.node[i]))
    }

    /// The node producing `name` if it is a `op`.
    pub(super) fn op(&self, name: &str, op: &str) -> Option<(usize, &'a NodeProto)> {
        self.node(name).filter(|(_, n)| n.op_type == op && n.domain.is_empty())
    }

    pub(super) fn uses(&self, name: &str) -> usize {
        self.uses.get(name).copied().unwrap_or(0)
    }

    /// The float values of a constant (initializer or Constant node), if `name` is one.
    pub(super) fn floats(&self, name: &str) -> Option<Vec<f32>> {
        if let Some(t) = self.initializers.get(name) {
            return tensor_floats(t);
        }
        let (_, n) = self.op(name, "Constant")?;
        let a = n.attribute.first()?;
        match a.name.as_str() {
            "value" => a.t.as_ref().and_then(tensor_floats),
            "value_float" => Some(vec![a.f]),
            "value_floats" => Some(a.floats.clone()),
            _ => None,
        }
    }

    /// The values of an int64 initializer, if `name` is one.
    pub(super) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let t = self.initializers.get(name).filter(|t| t.data_type == INT64)?;
        if !t.raw_data.is_empty() {
            return Some(t.raw_data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect());
        }
        Some(t.int64_data.clone())
    }

    /// `x` and the scalar `c` of `Mul(x, c)` / `Mul(c, x)` producing `name`.
    pub(super) fn scaled(&self, name: &str) -> Option<(usize, String, f32)> {
        let (i, n) = self.op(name, "Mul")?;
        for (x, c) in [(0, 1), (1, 0)] {
            if let Some(v) = self.floats(&n.input[c]) {
                if !v.is_empty() && v.iter().all(|&e| e == v[0]) {
                    return Some((i, n.input[x].clone(), v[0]));
                }
            }
        }
        None
    }

    /// The input of `Transpose(perm = [0, 1, 3, 2])` producing `name`.
    fn swapped(&self, name: &str) -> Option<(usize, String)> {
        let (i, n) = self.op(name, "Transpose")?;
        let perm = n.attribute.iter().find(|a| a.name == "perm")?;
        (perm.ints == [0, 1, 3, 2]).then(|| (i, n.input[0].clone()))
    }
}

/// Counts the uses of each name by the nodes of `g` and of its subgraphs (outer-scope references).
fn count_uses(g: &GraphProto, uses: &mut HashMap<String, usize>) {
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *uses.entry(i.clone()).or_default() += 1;
        }
        for a in &n.attribute {
            if let Some(sub) = a.g.as_ref() {
                count_uses(sub, uses);
            }
            a.graphs.iter().for_each(|sub| count_uses(sub, uses));
        }
    }
}

fn shape(v: &ValueInfoProto) -> Option<Shape> {
    let Some(type_proto::Value::TensorType(t)) = v.type_.as_ref().and_then(|t| t.value.as_ref()) else { return None };
    let dims = t
        .shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(dimension::Value::DimValue(n)) if n >= 0 => Some(n),
            _ => None,
        })
        .collect();
    Some(Shape { elem: t.elem_type, dims })
}

/// The values of a float32, float16 or bfloat16 tensor stored in the model, as f32.
pub(super) fn tensor_floats(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_location.enum_value_or_default() == DataLocation::EXTERNAL {
        return None;
    }
    let half = |bits: u16| match t.data_type {
        FLOAT16 => half::f16::from_bits(bits).to_f32(),
        _ => half::bf16::from_bits(bits).to_f32(),
    };
    match t.data_type {
        FLOAT if !t.raw_data.is_empty() => {
            Some(t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        FLOAT => Some(t.float_data.clone()),
        FLOAT16 | BFLOAT16 if !t.raw_data.is_empty() => {
            Some(t.raw_data.chunks_exact(2).map(|b| half(u16::from_le_bytes([b[0], b[1]]))).collect())
        }
        // 16-bit values are stored one per int32_data entry when not raw.
        FLOAT16 | BFLOAT16 => Some(t.int32_data.iter().map(|&v| half(v as u16)).collect()),
        _ => None,
    }
}

/// Matches the attention whose Softmax is node `sm` (see the module docs for the form).
fn find(view: &View<'_>, sm: usize) -> Result<Found, String> {
    let g = view.g;
    let softmax = &g.node[sm];
    let axis = softmax.attribute.iter().find(|a| a.name == "axis").map_or(-1, |a| a.i);
    let probs = &softmax.output[0];
    let scores_in = &softmax.input[0];
    let rank = view.shapes.get(scores_in.as_str()).map(|s| s.dims.len() as i64);
    if axis != -1 && Some(axis + 1) != rank {
        return Err("the softmax is not over the last axis".into());
    }
    // Scores, optionally plus a bias.
    let (mut chain, scores, bias) = match view.node(scores_in) {
        Some((i, n)) if n.op_type == "Add" && n.domain.is_empty() => {
            let j = (0..2).find(|&j| view.op(&n.input[j], "MatMul").is_some()).ok_or("the bias is not added to a MatMul")?;
            (vec![i], n.input[j].clone(), Some(n.input[1 - j].clone()))
        }
        Some((_, n)) if n.op_type == "MatMul" && n.domain.is_empty() => (Vec::new(), scores_in.clone(), None),
        _ => return Err("the softmax input is neither Q·Kᵀ nor Q·Kᵀ + bias".into()),
    };
    let (mm1, qk) = view.op(&scores, "MatMul").ok_or("no Q·Kᵀ MatMul")?;
    let (mul_q, q, cq) = view.scaled(&qk.input[0]).ok_or("Q is not multiplied by a constant before Q·Kᵀ")?;
    let (mut k_nodes, k, ck) = key_side(view, &qk.input[1])?;
    let consumers: Vec<usize> =
        g.node.iter().enumerate().filter(|(_, n)| n.input.iter().any(|i| i == probs)).map(|(i, _)| i).collect();
    let pv = match consumers[..] {
        [mm2] if g.node[mm2].op_type == "MatMul" && g.node[mm2].domain.is_empty() && g.node[mm2].input[0] == *probs => mm2,
        _ => {
            let ops: Vec<&str> = consumers.iter().map(|&i| g.node[i].op_type.as_str()).collect();
            return Err(format!("the probabilities go into {ops:?} (a guard?), not only P·V"));
        }
    };
    let (mm2, pv) = (pv, &g.node[pv]);
    // Every intermediate is used once, by the chain.
    let mut inner = vec![qk.input[0].clone(), qk.input[1].clone(), scores.clone(), probs.clone()];
    inner.extend(chain.iter().map(|&i| g.node[i].output[0].clone()));
    inner.extend(k_nodes.iter().map(|&i| g.node[i].output[0].clone()));
    if let Some(t) = inner.iter().find(|t| view.uses(t) != 1) {
        return Err(format!("`{t}` is used outside the attention"));
    }
    let q_shape = view.shapes.get(q.as_str()).filter(|s| s.dims.len() == 4).ok_or("Q has no declared [B, N, S, H] shape")?;
    let heads = q_shape.dims[1].ok_or("Q's head count is not static")?;
    if let Some(kh) = view.shapes.get(k.as_str()).and_then(|s| s.dims.get(1).copied().flatten()) {
        if kh != heads {
            return Err(format!("K has {kh} heads for {heads} query heads (grouped-query attention)"));
        }
    }
    let mask = match bias {
        None => Mask::None,
        Some(b) => mask(view, &b, q_shape)?,
    };
    chain.extend([mul_q, mm1, sm]);
    chain.append(&mut k_nodes);
    chain.push(mm2);
    let scale = (cq as f64 * ck as f64) as f32;
    Ok(Found { chain, q, k, v: pv.input[1].clone(), scale, heads, mask, output: pv.output[0].clone(), elem: q_shape.elem })
}

/// The K side of Q·Kᵀ: `Transpose(Mul(K, c))` or `Mul(Transpose(K), c)`; its nodes, K and c.
fn key_side(view: &View<'_>, kt: &str) -> Result<(Vec<usize>, String, f32), String> {
    if let Some((t, inner)) = view.swapped(kt) {
        if let Some((m, k, c)) = view.scaled(&inner) {
            return Ok((vec![t, m], k, c));
        }
    }
    if let Some((m, inner, c)) = view.scaled(kt) {
        if let Some((t, k)) = view.swapped(&inner) {
            return Ok((vec![m, t], k, c));
        }
    }
    Err("K is not a scaled [0, 1, 3, 2] transpose before Q·Kᵀ".into())
}

/// The mask of a bias `Where(mask, 0, lowest)`.
fn mask(view: &View<'_>, bias: &str, q: &Shape) -> Result<Mask, String> {
    let (_, w) = view.op(bias, "Where").ok_or("the bias is not Where(mask, 0, lowest)")?;
    let zero = view.floats(&w.input[1]).is_some_and(|v| !v.is_empty() && v.iter().all(|&x| x == 0.0));
    let low = view.floats(&w.input[2]).is_some_and(|v| !v.is_empty() && v.iter().all(|&x| x <= MASKED));
    if !zero || !low {
        return Err("the bias is not Where(mask, 0, lowest)".into());
    }
    let cond = w.input[0].clone();
    let dims = &view
        .shapes
        .get(cond.as_str())
        .filter(|s| s.dims.len() == 4 && s.elem == BOOL)
        .ok_or("the mask has no [B, 1, S|1, T] bool shape")?
        .dims;
    if dims[1] != Some(1) {
        return Err("the mask differs per head".into());
    }
    Ok(if dims[2] == Some(1) {
        Mask::KeyPadding(cond)
    } else {
        Mask::Full { cond, expand: dims[0] == Some(1) && q.dims[0] != Some(1) }
    })
}

/// Rewrites every attention of `model` (see the module docs); a model without any is left unchanged.
pub fn rewrite(model: &mut ModelProto) -> Summary {
    let mut summary = Summary::default();
    let Some(graph) = model.graph.as_mut() else { return summary };
    let opset = model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version);
    let mut found: Vec<Found> = {
        let view = View::new(graph);
        let softmaxes = graph.node.iter().enumerate().filter(|(_, n)| n.op_type == "Softmax" && n.domain.is_empty());
        let mut found = Vec::new();
        for (i, n) in softmaxes {
            // Squeeze/Unsqueeze take their axes as inputs from opset 13 on.
            let f = if opset >= 13 { find(&view, i) } else { Err(format!("default-domain opset {opset} < 13")) };
            let f = f.and_then(|f| match f.elem {
                FLOAT => Ok(f),
                _ => Err("not float32 (ONNX Runtime's MultiHeadAttention CPU kernel is float32 only)".into()),
            });
            match f {
                Ok(f) => found.push(f),
                Err(reason) => summary.skipped.push(format!("{}: {reason}", label(n))),
            }
        }
        found
    };
    if found.is_empty() {
        return summary;
    }
    // Emitted in the order of their second MatMul, so a shared mask is built before its first use.
    found.sort_by_key(|f| f.chain.last().copied());
    let mut emit = Emitter::default();
    let mut at: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut removed = HashSet::new();
    for f in &found {
        match f.mask {
            Mask::None => summary.flash += 1,
            Mask::KeyPadding(_) => summary.per_row += 1,
            Mask::Full { .. } => summary.masked += 1,
        }
        let last = *f.chain.last().expect("a chain ends with its second MatMul");
        at.insert(last, emit.attention(f));
        removed.extend(f.chain.iter().copied());
    }
    let old = std::mem::take(&mut graph.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(nodes) = at.remove(&i) {
            graph.node.extend(nodes);
        }
        if !removed.contains(&i) {
            graph.node.push(n);
        }
    }
    graph.initializer.extend(emit.constants());
    prune(graph);
    if !model.opset_import.iter().any(|o| o.domain == MS_DOMAIN) {
        model.opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1, ..Default::default() });
    }
    summary
}

fn label(n: &NodeProto) -> String {
    if n.name.is_empty() {
        format!("Softmax({})", n.input.first().map_or("", String::as_str))
    } else {
        n.name.clone()
    }
}

/// Removes the nodes nothing uses any more (the dropped masks' bias nodes) and the shapes of the
/// tensors that no longer exist.
pub(super) fn prune(g: &mut GraphProto) {
    loop {
        let mut uses = HashMap::new();
        count_uses(g, &mut uses);
        let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
        let keep: Vec<bool> =
            g.node.iter().map(|n| n.output.iter().any(|o| uses.contains_key(o) || outputs.contains(o.as_str()))).collect();
        if keep.iter().all(|&k| k) {
            break;
        }
        let mut k = keep.into_iter();
        g.node.retain(|_| k.next().unwrap_or(true));
    }
    let produced: HashSet<String> = g.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    g.value_info.retain(|v| produced.contains(&v.name));
}

/// Builds the replacement nodes and the constants they share.
#[derive(Default)]
struct Emitter {
    count: usize,
    /// Derived mask tensors by the mask they come from (shared by the attentions using one mask).
    masks: HashMap<String, String>,
    /// `[0, 0, heads, -1]` reshape targets by head count.
    heads: HashSet<i64>,
}

impl Emitter {
    /// The shared int64 constants.
    fn constants(&self) -> Vec<TensorProto> {
        let mut out = vec![
            ints(&format!("{PREFIX}/bsd"), &[3], &[0, 0, -1]),
            ints(&format!("{PREFIX}/axes0"), &[1], &[0]),
            ints(&format!("{PREFIX}/axes1"), &[1], &[1]),
            ints(&format!("{PREFIX}/axes12"), &[2], &[1, 2]),
            ints(&format!("{PREFIX}/zero"), &[], &[0]),
            ints(&format!("{PREFIX}/one"), &[], &[1]),
            ints(&format!("{PREFIX}/first"), &[1], &[0]),
            ints(&format!("{PREFIX}/ones2"), &[2], &[1, 1]),
        ];
        let mut heads: Vec<i64> = self.heads.iter().copied().collect();
        heads.sort_unstable();
        out.extend(heads.iter().map(|&n| ints(&format!("{PREFIX}/bnsh{n}"), &[4], &[0, 0, n, -1])));
        out
    }

    /// The nodes that replace attention `f`, in order.
    fn attention(&mut self, f: &Found) -> Vec<NodeProto> {
        let p = format!("{PREFIX}/{}", self.count);
        self.count += 1;
        self.heads.insert(f.heads);
        let mut nodes = Vec::new();
        let [q, k, v] = [("q", &f.q), ("k", &f.k), ("v", &f.v)].map(|(tag, x)| {
            nodes.push(node("Transpose", &format!("{p}/{tag}_bsnh"), &[x], &[attr_ints("perm", &[0, 2, 1, 3])]));
            nodes.push(node("Reshape", &format!("{p}/{tag}"), &[&format!("{p}/{tag}_bsnh"), &format!("{PREFIX}/bsd")], &[]));
            format!("{p}/{tag}")
        });
        let y = format!("{p}/y");
        match &f.mask {
            Mask::None => nodes.push(self.mha(&y, &[&q, &k, &v], f, false)),
            Mask::Full { cond, expand } => {
                let kpm = self.full_mask(&mut nodes, cond, *expand, &f.q);
                nodes.push(self.mha(&y, &[&q, &k, &v, "", &kpm], f, true));
            }
            Mask::KeyPadding(cond) => {
                let keep = self.mask_once(&mut nodes, cond, "keys", |out| {
                    vec![node("Squeeze", out, &[cond, &format!("{PREFIX}/axes12")], &[])]
                });
                nodes.extend(self.per_row(&p, [&q, &k, &v], &keep, f));
            }
        }
        let y4 = format!("{p}/y4");
        nodes.push(node("Reshape", &y4, &[&y, &format!("{PREFIX}/bnsh{}", f.heads)], &[]));
        let mut out = node("Transpose", &format!("{p}/out"), &[&y4], &[attr_ints("perm", &[0, 2, 1, 3])]);
        out.output = vec![f.output.clone()];
        nodes.push(out);
        nodes
    }

    fn mha(&self, out: &str, inputs: &[&str], f: &Found, masked: bool) -> NodeProto {
        let mut attrs = vec![attr_int("num_heads", f.heads), attr_float("scale", f.scale)];
        if masked {
            attrs.push(attr_float("mask_filter_value", f32::MIN));
        }
        let mut n = node("MultiHeadAttention", out, inputs, &attrs);
        n.domain = MS_DOMAIN.into();
        n
    }

    /// A tensor derived from mask `cond` by `build` (which names its result `out`), built once.
    fn mask_once(
        &mut self,
        nodes: &mut Vec<NodeProto>,
        cond: &str,
        kind: &str,
        build: impl FnOnce(&str) -> Vec<NodeProto>,
    ) -> String {
        let key = format!("{kind}:{cond}");
        if let Some(name) = self.masks.get(&key) {
            return name.clone();
        }
        let out = format!("{PREFIX}/mask{}/{kind}", self.masks.len());
        nodes.extend(build(&out));
        self.masks.insert(key, out.clone());
        out
    }

    /// MultiHeadAttention's 3-D key_padding_mask `[B, S, T]` (int32) from a bool `[B|1, 1, S, T]`.
    fn full_mask(&mut self, nodes: &mut Vec<NodeProto>, cond: &str, expand: bool, q4: &str) -> String {
        let kind = if expand { "kpm_expanded" } else { "kpm" };
        self.mask_once(nodes, cond, kind, |out| {
            let mut v = vec![node("Squeeze", &format!("{out}_3d"), &[cond, &format!("{PREFIX}/axes1")], &[])];
            let mut last = format!("{out}_3d");
            if expand {
                v.push(node("Shape", &format!("{out}_qshape"), &[q4], &[]));
                v.push(node("Gather", &format!("{out}_b"), &[&format!("{out}_qshape"), &format!("{PREFIX}/first")], &[]));
                let parts = [format!("{out}_b"), format!("{PREFIX}/ones2")];
                v.push(node("Concat", &format!("{out}_shape"), &[&parts[0], &parts[1]], &[attr_int("axis", 0)]));
                v.push(node("Expand", &format!("{out}_expanded"), &[&last, &format!("{out}_shape")], &[]));
                last = format!("{out}_expanded");
            }
            v.push(node("Cast", out, &[&last], &[attr_int("to", INT32 as i64)]));
            v
        })
    }

    /// Row `i` of q, k, v (`[1, S|T, D]`) attends its valid keys only (NonZero of `keep[i]`), no mask: the
    /// nodes, named `{p}/{s}`, that give `{p}/y` (`[1, S, D]`).
    fn one_row(&self, p: &str, [q, k, v]: [&str; 3], keep: &str, i: &str, f: &Found) -> Vec<NodeProto> {
        let b = |s: &str| format!("{p}/{s}");
        vec![
            node("Gather", &b("keep"), &[keep, i], &[attr_int("axis", 0)]),
            node("NonZero", &b("nz"), &[&b("keep")], &[]),
            node("Squeeze", &b("idx"), &[&b("nz"), &format!("{PREFIX}/axes0")], &[]),
            node("Gather", &b("k_valid"), &[k, &b("idx")], &[attr_int("axis", 1)]),
            node("Gather", &b("v_valid"), &[v, &b("idx")], &[attr_int("axis", 1)]),
            self.mha(&b("y"), &[q, &b("k_valid"), &b("v_valid")], f, false),
        ]
    }

    /// Each batch row attends its valid keys only: a batch of one directly, a larger one in a Loop over the
    /// rows (`If` on the batch size).
    fn per_row(&self, p: &str, [q, k, v]: [&str; 3], keep: &str, f: &Found) -> Vec<NodeProto> {
        let b = |s: &str| format!("{p}/row/{s}");
        let axes0 = format!("{PREFIX}/axes0");
        let mut body = vec![node("Unsqueeze", &b("i1"), &[&b("i"), &axes0], &[])];
        for (x, tag) in [(q, "q"), (k, "k"), (v, "v")] {
            body.push(node("Gather", &b(tag), &[x, &b("i1")], &[attr_int("axis", 0)]));
        }
        body.extend(self.one_row(&b("r"), [&b("q"), &b("k"), &b("v")], keep, &b("i"), f));
        body.push(node("Squeeze", &b("y2"), &[&b("r/y"), &axes0], &[]));
        body.push(node("Identity", &b("cond_out"), &[&b("cond")], &[]));
        let body = GraphProto {
            name: b("body"),
            node: body,
            input: vec![value(&b("i"), INT64, 0), value(&b("cond"), BOOL, 0)],
            output: vec![value(&b("cond_out"), BOOL, 0), value(&b("y2"), FLOAT, 2)],
            ..Default::default()
        };
        let rows = format!("{p}/rows");
        let looped = GraphProto {
            name: format!("{p}/rows_loop"),
            node: vec![node("Loop", &format!("{p}/y_rows"), &[&rows, ""], &[attr_graph("body", body)])],
            output: vec![value(&format!("{p}/y_rows"), FLOAT, 3)],
            ..Default::default()
        };
        let single = GraphProto {
            name: format!("{p}/single"),
            node: self.one_row(&format!("{p}/one"), [q, k, v], keep, &format!("{PREFIX}/zero"), f),
            output: vec![value(&format!("{p}/one/y"), FLOAT, 3)],
            ..Default::default()
        };
        let mut branch = node("If", &format!("{p}/y"), &[&format!("{p}/single_row")], &[]);
        branch.attribute = vec![attr_graph("then_branch", single), attr_graph("else_branch", looped)];
        vec![
            node("Shape", &format!("{p}/qshape"), &[q], &[]),
            node("Gather", &rows, &[&format!("{p}/qshape"), &format!("{PREFIX}/zero")], &[attr_int("axis", 0)]),
            node("Equal", &format!("{p}/single_row"), &[&rows, &format!("{PREFIX}/one")], &[]),
            branch,
        ]
    }
}

/// A node named after (and with the one output) `out`.
pub(super) fn node(op: &str, out: &str, inputs: &[&str], attrs: &[AttributeProto]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: out.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute: attrs.to_vec(),
        ..Default::default()
    }
}

pub(super) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), type_: AttributeType::INT.into(), i, ..Default::default() }
}

pub(super) fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), type_: AttributeType::FLOAT.into(), f, ..Default::default() }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), type_: AttributeType::INTS.into(), ints: ints.to_vec(), ..Default::default() }
}

fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto { name: name.into(), type_: AttributeType::GRAPH.into(), g: Some(g).into(), ..Default::default() }
}

pub(super) fn ints(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto { name: name.into(), dims: dims.to_vec(), data_type: INT64, int64_data: values.to_vec(), ..Default::default() }
}

/// A tensor value of element type `elem` and rank `rank` (dims unknown).
fn value(name: &str, elem: i32, rank: usize) -> ValueInfoProto {
    let shape = TensorShapeProto { dim: vec![Dimension::default(); rank], ..Default::default() };
    let tensor = type_proto::Tensor { elem_type: elem, shape: Some(shape).into(), ..Default::default() };
    let ty = TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() };
    ValueInfoProto { name: name.into(), type_: Some(ty).into(), ..Default::default() }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::runtime::ort::{OrtBackend, OrtSettings};
    use crate::runtime::{Engine, Tensor};
    use onnx_protobuf::Message;
    use std::path::{Path, PathBuf};

    fn dim(d: &str) -> Dimension {
        let value = match d.parse::<i64>() {
            Ok(n) => dimension::Value::DimValue(n),
            Err(_) => dimension::Value::DimParam(d.into()),
        };
        Dimension { value: Some(value), ..Default::default() }
    }

    pub(in crate::runtime) fn input(name: &str, elem: i32, dims: &[&str]) -> ValueInfoProto {
        let mut v = value(name, elem, 0);
        if let Some(type_proto::Value::TensorType(t)) = v.type_.as_mut().and_then(|t| t.value.as_mut()) {
            t.shape = Some(TensorShapeProto { dim: dims.iter().map(|d| dim(d)).collect(), ..Default::default() }).into();
        }
        v
    }

    pub(in crate::runtime) fn scalar(name: &str, x: f32) -> TensorProto {
        TensorProto { name: name.into(), data_type: FLOAT, raw_data: x.to_le_bytes().to_vec(), ..Default::default() }
    }

    pub(in crate::runtime) fn op(kind: &str, out: &str, inputs: &[&str]) -> NodeProto {
        node(kind, out, inputs, &[])
    }

    /// How a test graph's attention is built.
    #[derive(Clone, Copy, PartialEq)]
    enum Form {
        /// The exported form, with or without the mask input `mask`.
        Canonical,
        /// torch's SDPA decomposition: an IsNaN/Where guard between the softmax and P·V.
        Guarded,
        /// The bias is the mask cast to float, not Where(mask, 0, lowest).
        CastBias,
    }

    /// `y = attention(q, k, v, mask)` over inputs q [b, heads, s, 8], k/v [b, kv_heads, t, 8] and, when
    /// `mask` has dims, a bool mask input of those dims; `attentions` chains that many in a row
    /// (each output is the next one's query), sharing the mask.
    fn graph(heads: i64, kv_heads: i64, mask: Option<&[&str]>, form: Form, attentions: usize) -> ModelProto {
        let c = (8f32).powf(-0.25);
        let h = heads.to_string();
        let kh = kv_heads.to_string();
        let mut inputs = vec![
            input("q", FLOAT, &["b", &h, "s", "8"]),
            input("k", FLOAT, &["b", &kh, "t", "8"]),
            input("v", FLOAT, &["b", &kh, "t", "8"]),
        ];
        let mut nodes = Vec::new();
        let mut inits = vec![scalar("c", c), scalar("zero", 0.0), scalar("low", f32::MIN), scalar("one", 1.0)];
        if let Some(dims) = mask {
            inputs.push(input("mask", BOOL, dims));
            match form {
                Form::CastBias => nodes.push(node("Cast", "bias", &["mask"], &[attr_int("to", FLOAT as i64)])),
                _ => nodes.push(op("Where", "bias", &["mask", "zero", "low"])),
            }
        }
        let mut q = "q".to_string();
        for i in 0..attentions {
            let n = |s: &str| format!("a{i}/{s}");
            nodes.push(op("Mul", &n("qs"), &[&q, "c"]));
            nodes.push(op("Mul", &n("ks"), &["k", "c"]));
            nodes.push(node("Transpose", &n("kt"), &[&n("ks")], &[attr_ints("perm", &[0, 1, 3, 2])]));
            nodes.push(op("MatMul", &n("scores"), &[&n("qs"), &n("kt")]));
            let mut last = n("scores");
            if mask.is_some() {
                nodes.push(op("Add", &n("biased"), &["bias", &last]));
                last = n("biased");
            }
            nodes.push(node("Softmax", &n("p"), &[&last], &[attr_int("axis", -1)]));
            last = n("p");
            if form == Form::Guarded {
                nodes.push(op("IsNaN", &n("nan"), &[&last]));
                nodes.push(op("Where", &n("p0"), &[&n("nan"), "zero", &last]));
                last = n("p0");
            }
            nodes.push(op("MatMul", &n("y"), &[&last, "v"]));
            q = n("y");
        }
        nodes.push(op("Mul", "y", &[&q, "one"]));
        let g = GraphProto {
            name: "attention".into(),
            node: nodes,
            initializer: std::mem::take(&mut inits),
            input: inputs,
            output: vec![input("y", FLOAT, &["b", &h, "s", "8"])],
            // Shapes as the exporter declares them: each attention's output is the next one's query.
            value_info: (0..attentions).map(|i| input(&format!("a{i}/y"), FLOAT, &["b", &h, "s", "8"])).collect(),
            ..Default::default()
        };
        let opset = OperatorSetIdProto { domain: String::new(), version: 18, ..Default::default() };
        ModelProto { ir_version: 8, graph: Some(g).into(), opset_import: vec![opset], ..Default::default() }
    }

    pub(in crate::runtime) fn count(m: &ModelProto, op: &str) -> usize {
        fn walk(g: &GraphProto, op: &str) -> usize {
            g.node
                .iter()
                .map(|n| {
                    let sub: usize = n.attribute.iter().filter_map(|a| a.g.as_ref()).map(|s| walk(s, op)).sum();
                    usize::from(n.op_type == op) + sub
                })
                .sum()
        }
        walk(m.graph.as_ref().unwrap(), op)
    }

    pub(in crate::runtime) fn backend(plain: bool) -> OrtBackend {
        OrtBackend::new(OrtSettings { intra_threads: Some(1), plain_graph: plain, ..Default::default() })
            .unwrap_or_else(|e| panic!("ONNX Runtime is needed for these tests: {e}"))
    }

    /// Runs `model` with the rewrite (`plain` = false) or as it is, and returns `y`.
    pub(in crate::runtime) fn run(model: &ModelProto, plain: bool, feeds: &[(&str, Tensor)]) -> ndarray::ArrayD<f32> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, model.write_to_bytes().unwrap()).unwrap();
        let mut e = backend(plain).load("attention", &path).unwrap_or_else(|e| panic!("{e}"));
        let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
        e.run(&refs).unwrap().take("y").unwrap().into_f32().unwrap()
    }

    /// Deterministic values in [-2, 2).
    pub(in crate::runtime) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn qkv(b: usize, heads: usize, kv_heads: usize, s: usize, t: usize) -> Vec<(&'static str, Tensor)> {
        vec![
            ("q", Tensor::f32(&[b, heads, s, 8], values(b * heads * s * 8, 1))),
            ("k", Tensor::f32(&[b, kv_heads, t, 8], values(b * kv_heads * t * 8, 2))),
            ("v", Tensor::f32(&[b, kv_heads, t, 8], values(b * kv_heads * t * 8, 3))),
        ]
    }

    fn bool_mask(dims: &[usize], keep: impl Fn(&[usize]) -> bool) -> Tensor {
        use ndarray::Dimension;
        let a = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(dims), |i| keep(i.slice()));
        Tensor::Bool(a)
    }

    pub(in crate::runtime) fn max_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn unmasked_attention_becomes_flash_multihead_attention() {
        let mut m = graph(2, 2, None, Form::Canonical, 1);
        let plain = m.clone();
        let s = rewrite(&mut m);
        assert_eq!(s, Summary { flash: 1, ..Default::default() });
        assert_eq!((count(&m, "Softmax"), count(&m, "MultiHeadAttention"), count(&m, "MatMul")), (0, 1, 0));
        let feeds = qkv(2, 2, 2, 37, 29);
        let d = max_diff(&run(&m, true, &feeds), &run(&plain, true, &feeds));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn key_padding_runs_each_row_over_its_valid_keys() {
        let (b, s, t) = (3, 11, 23);
        let mut m = graph(2, 2, Some(&["b", "1", "1", "t"]), Form::Canonical, 1);
        let plain = m.clone();
        assert_eq!(rewrite(&mut m), Summary { per_row: 1, ..Default::default() });
        assert_eq!((count(&m, "Softmax"), count(&m, "If"), count(&m, "Loop"), count(&m, "MultiHeadAttention")), (0, 1, 1, 2));
        // Row 0 fully valid, row 1 padded in the middle (like the joint text + image keys), row 2 one key.
        let keep = |i: &[usize]| match i[0] {
            0 => true,
            1 => !(5..12).contains(&i[3]),
            _ => i[3] == 17,
        };
        let mut feeds = qkv(b, 2, 2, s, t);
        feeds.push(("mask", bool_mask(&[b, 1, 1, t], keep)));
        let got = run(&m, false, &feeds);
        let d = max_diff(&got, &run(&plain, false, &feeds));
        assert!(d < 1e-5, "{d}");
        // A row alone gives the same bits as in the batch.
        let row = |t: &Tensor| match t {
            Tensor::F32(a) => Tensor::F32(a.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned()),
            Tensor::Bool(a) => Tensor::Bool(a.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned()),
            _ => unreachable!(),
        };
        let alone: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (*n, row(t))).collect();
        let one = run(&m, false, &alone);
        assert_eq!(one, got.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned());
    }

    #[test]
    fn a_row_without_valid_keys_gives_zeros() {
        let mut m = graph(1, 1, Some(&["b", "1", "1", "t"]), Form::Canonical, 1);
        rewrite(&mut m);
        let mut feeds = qkv(2, 1, 1, 4, 6);
        feeds.push(("mask", bool_mask(&[2, 1, 1, 6], |i| i[0] == 0)));
        let y = run(&m, false, &feeds);
        assert!(y.slice_axis(ndarray::Axis(0), (1..2).into()).iter().all(|&x| x == 0.0));
        assert!(y.slice_axis(ndarray::Axis(0), (0..1).into()).iter().any(|&x| x != 0.0));
        // A batch of one (no Loop) likewise.
        let mut feeds = qkv(1, 1, 1, 4, 6);
        feeds.push(("mask", bool_mask(&[1, 1, 1, 6], |_| false)));
        assert!(run(&m, false, &feeds).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn full_masks_use_a_3d_key_padding_mask() {
        // Causal and right padding per row, like the language model.
        let (b, s) = (2, 13);
        let mut m = graph(2, 2, Some(&["b", "1", "s", "s"]), Form::Canonical, 1);
        let plain = m.clone();
        assert_eq!(rewrite(&mut m), Summary { masked: 1, ..Default::default() });
        let mut feeds = qkv(b, 2, 2, s, s);
        feeds.push(("mask", bool_mask(&[b, 1, s, s], |i| i[3] <= i[2] && (i[0] == 0 || i[3] < 9))));
        let d = max_diff(&run(&m, false, &feeds), &run(&plain, false, &feeds));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn a_batch_one_mask_is_expanded_to_the_queries_batch() {
        // Segments (as the vision tower's windows), one mask for every batch row.
        let (b, s) = (2, 12);
        let mut m = graph(1, 1, Some(&["1", "1", "s", "s"]), Form::Canonical, 1);
        let plain = m.clone();
        assert_eq!(rewrite(&mut m).masked, 1);
        assert_eq!(count(&m, "Expand"), 1);
        let mut feeds = qkv(b, 1, 1, s, s);
        feeds.push(("mask", bool_mask(&[1, 1, s, s], |i| i[2] / 5 == i[3] / 5)));
        let d = max_diff(&run(&m, false, &feeds), &run(&plain, false, &feeds));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn attentions_sharing_a_mask_share_its_conversion() {
        let mut m = graph(2, 2, Some(&["b", "1", "s", "t"]), Form::Canonical, 3);
        let plain = m.clone();
        assert_eq!(rewrite(&mut m).masked, 3);
        assert_eq!((count(&m, "Cast"), count(&m, "Where")), (1, 0), "one int32 mask, the bias gone");
        let mut feeds = qkv(2, 2, 2, 9, 9);
        feeds.push(("mask", bool_mask(&[2, 1, 9, 9], |i| i[3] <= i[2])));
        let d = max_diff(&run(&m, false, &feeds), &run(&plain, false, &feeds));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn other_forms_are_left_alone_with_a_reason() {
        let cases: [(ModelProto, &str); 3] = [
            (graph(2, 2, Some(&["b", "1", "1", "t"]), Form::Guarded, 1), "IsNaN"),
            (graph(2, 2, Some(&["b", "1", "1", "t"]), Form::CastBias, 1), "Where(mask, 0, lowest)"),
            (graph(4, 2, None, Form::Canonical, 1), "grouped-query"),
        ];
        for (m, why) in cases {
            let mut rewritten = m.clone();
            let s = rewrite(&mut rewritten);
            assert_eq!(s.rewritten(), 0);
            assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
            assert!(s.skipped[0].contains(why), "{:?}", s.skipped);
            assert_eq!(rewritten, m, "an unmatched graph is not touched");
        }
        // The guarded graph still runs, unfused.
        let m = graph(1, 1, Some(&["b", "1", "1", "t"]), Form::Guarded, 1);
        let mut feeds = qkv(1, 1, 1, 3, 4);
        feeds.push(("mask", bool_mask(&[1, 1, 1, 4], |_| true)));
        assert_eq!(run(&m, false, &feeds).shape(), &[1, 1, 3, 8]);
    }

    // ------------------------------------------------------------------------------------------
    // The committed graphs, as each backend runs them

    pub(in crate::runtime) fn committed(bundle: &str, component: &str) -> (PathBuf, ModelProto) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines").join(bundle).join(format!("{component}.onnx"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (path, ModelProto::parse_from_bytes(&bytes).unwrap())
    }

    /// Softmax nodes over a (tokens x tokens) tensor: their input's last two dims are not static (or
    /// its shape is unknown).
    fn token_softmaxes(m: &ModelProto) -> Vec<String> {
        let g = m.graph.as_ref().unwrap();
        let view = View::new(g);
        g.node
            .iter()
            .filter(|n| n.op_type == "Softmax")
            .filter(|n| {
                view.shapes
                    .get(n.input[0].as_str())
                    .is_none_or(|s| s.dims.len() < 2 || s.dims.iter().rev().take(2).all(Option::is_none))
            })
            .map(label)
            .collect()
    }

    const GRAPHS: [(&str, &str, Summary); 5] = [
        ("tiny", "transformer", Summary { flash: 0, per_row: 2, masked: 0, skipped: Vec::new() }),
        ("tiny-2511", "transformer", Summary { flash: 0, per_row: 2, masked: 0, skipped: Vec::new() }),
        ("tiny", "text_encoder", Summary { flash: 0, per_row: 0, masked: 6, skipped: Vec::new() }),
        ("tiny", "vae_encoder", Summary { flash: 1, per_row: 0, masked: 0, skipped: Vec::new() }),
        ("tiny", "vae_decoder", Summary { flash: 1, per_row: 0, masked: 0, skipped: Vec::new() }),
    ];

    /// Every Softmax of `model` sits in the one attention form TensorRT's fusion takes.
    fn assert_fusable_form(bundle: &str, component: &str, model: &ModelProto) {
        let g = model.graph.as_ref().unwrap();
        let view = View::new(g);
        for (i, n) in g.node.iter().enumerate().filter(|(_, n)| n.op_type == "Softmax") {
            if let Err(e) = find(&view, i) {
                panic!("{bundle}/{component}: {} is not in TensorRT's fused-attention form: {e}", label(n));
            }
        }
    }

    /// TensorRT parses the exported graph: each Softmax over tokens x tokens sits in the one attention
    /// form its fusion takes (no guard, scale before Q·Kᵀ, only a mask add before the softmax).
    /// ONNX Runtime runs the rewritten graph: no such Softmax is left, each is a MultiHeadAttention.
    #[test]
    fn committed_graphs_hold_no_unfused_attention() {
        for (bundle, component, want) in GRAPHS {
            let (_, model) = committed(bundle, component);
            let softmaxes = token_softmaxes(&model);
            assert_eq!(softmaxes.len(), want.rewritten(), "{bundle}/{component}: {softmaxes:?}");
            assert_fusable_form(bundle, component, &model);
            let mut rewritten = model.clone();
            assert_eq!(rewrite(&mut rewritten), want, "{bundle}/{component}");
            assert_eq!(token_softmaxes(&rewritten), Vec::<String>::new(), "{bundle}/{component}");
            let nodes = want.flash + want.masked + 2 * want.per_row;
            assert_eq!(count(&rewritten, "MultiHeadAttention"), nodes, "{bundle}/{component}");
        }
    }

    /// The 16-bit bundles (for TensorRT) carry the same form; ONNX Runtime's MultiHeadAttention CPU
    /// kernel is float32 only, so on the CPU their attentions are left as exported, each with that reason.
    #[test]
    fn sixteen_bit_graphs_hold_the_fusable_form() {
        for bundle in ["tiny-fp16", "tiny-bf16"] {
            for (component, attentions) in [("transformer", 2), ("text_encoder", 6), ("vae_encoder", 1), ("vae_decoder", 1)] {
                let (_, model) = committed(bundle, component);
                assert_eq!(token_softmaxes(&model).len(), attentions, "{bundle}/{component}");
                assert_fusable_form(bundle, component, &model);
                let mut rewritten = model.clone();
                let s = rewrite(&mut rewritten);
                assert_eq!((s.rewritten(), s.skipped.len()), (0, attentions), "{bundle}/{component}");
                assert!(s.skipped.iter().all(|r| r.contains("float32 only")), "{bundle}/{component}: {:?}", s.skipped);
                assert_eq!(rewritten, model, "{bundle}/{component}");
            }
        }
    }

    /// The rewritten transformer equals the exported one (batch of 2, the second row's text padded),
    /// and a row gives the same bits alone and in the batch.
    #[test]
    fn committed_transformer_rewritten_matches_the_exported_one() {
        let (path, _) = committed("tiny", "transformer");
        let load = |plain| backend(plain).load("transformer", &path).unwrap();
        let (img, txt) = (40, 20);
        let inputs = |b: usize, seed: u64| {
            let mut mask = vec![1i64; b * txt];
            mask[(b - 1) * txt + 13..].fill(0);
            let ang = |n: usize, s| values(n * 64, s);
            vec![
                ("hidden_states", Tensor::f32(&[b, img, 64], values(b * img * 64, seed))),
                ("encoder_hidden_states", Tensor::f32(&[b, txt, 64], values(b * txt * 64, seed + 1))),
                ("encoder_hidden_states_mask", Tensor::i64(&[b, txt], mask)),
                ("timestep", Tensor::f32(&[b], vec![0.5; b])),
                ("img_cos", Tensor::f32(&[img, 64], ang(img, 7).iter().map(|a| a.cos()).collect())),
                ("img_sin", Tensor::f32(&[img, 64], ang(img, 7).iter().map(|a| a.sin()).collect())),
                ("txt_cos", Tensor::f32(&[txt, 64], ang(txt, 8).iter().map(|a| a.cos()).collect())),
                ("txt_sin", Tensor::f32(&[txt, 64], ang(txt, 8).iter().map(|a| a.sin()).collect())),
            ]
        };
        let go = |e: &mut crate::runtime::ort::OrtEngine, feeds: &[(&str, Tensor)]| {
            let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
            e.run(&refs).unwrap().take("sample").unwrap().into_f32().unwrap()
        };
        let mut fused = load(false);
        assert_eq!(fused.attention().per_row, 2);
        let batch = inputs(2, 1);
        let (a, b) = (go(&mut fused, &batch), go(&mut load(true), &batch));
        let rel = (a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>()
            / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>())
        .sqrt();
        assert!(rel < 1e-6, "rel L2 {rel}");
        // The padded row alone (batch 1 built from the same values).
        let alone: Vec<(&str, Tensor)> = batch
            .iter()
            .map(|(n, t)| {
                let t = match t {
                    Tensor::F32(x) if x.ndim() == 3 => Tensor::F32(x.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned()),
                    Tensor::F32(x) if *n == "timestep" => Tensor::F32(x.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned()),
                    Tensor::I64(x) => Tensor::I64(x.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned()),
                    other => other.clone(),
                };
                (*n, t)
            })
            .collect();
        assert_eq!(go(&mut fused, &alone), a.slice_axis(ndarray::Axis(0), (1..2).into()).to_owned());
    }
}
