//! ONNX Runtime's fused RMSNorm, tanh GELU and rotary embedding: before a session is built, each exported chain
//! becomes one `SimplifiedLayerNormalization`, `com.microsoft.FastGelu` or `com.microsoft.RotaryEmbedding`.
//!
//! torch exports `x * rsqrt(mean(x², -1) + eps) * w` (the transformer's and the text encoder's RMSNorms) as Pow,
//! ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul; `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (the transformer's
//! MLP) as eight elementwise nodes; and the transformer's RoPE, `x` as complex pairs times `cos + i sin`, as a
//! Reshape to pairs, two Gathers, four Muls, a Sub, an Add, two Unsqueezes and a Concat: each node a pass over the
//! activations. ONNX Runtime's own fusions take none of these forms on its CPU provider (its RMSNorm fusion wants
//! `Div`, its GELU fusion is for GPU providers). One node each computes the same in one pass (a transformer call at
//! 8,192 image tokens: about 13% less time). The GELU's bias `Add` goes into FastGelu when nothing else reads the
//! sum. Only float32 chains are rewritten, anything else is left as exported; TensorRT reads the exported graph
//! (docs/tensorrt.md). ONNX Runtime's backend applies it to the transformer only (runtime::ort says why).

use std::collections::HashMap;

use onnx_protobuf::{ModelProto, NodeProto, OperatorSetIdProto};

use super::attention::{self, View, FLOAT, MS_DOMAIN};

/// What the rewrite did to one graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fused {
    /// RMSNorm chains now one `SimplifiedLayerNormalization`.
    pub rms_norms: usize,
    /// Tanh GELU chains now one `com.microsoft.FastGelu`.
    pub gelus: usize,
    /// Rotary embeddings (interleaved pairs) now one `com.microsoft.RotaryEmbedding`.
    pub ropes: usize,
}

/// `√(2/π)` and the cubic coefficient of the tanh GELU.
const GELU_SCALE: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// The value of a one-element float constant of rank 0 or 1 (as a broadcast operand it cannot change the other
/// operand's shape, which the fused node keeps).
fn scalar(view: &View<'_>, name: &str) -> Option<f32> {
    let rank = match view.initializers.get(name) {
        Some(t) => t.dims.len(),
        None => view.op(name, "Constant")?.1.attribute.first()?.t.as_ref().map_or(0, |t| t.dims.len()),
    };
    match view.floats(name)?.as_slice() {
        [v] if rank <= 1 => Some(*v),
        _ => None,
    }
}

/// `x` and `c` of `Mul(x, c)` / `Mul(c, x)` producing `name`, `c` a [`scalar`].
fn scaled(view: &View<'_>, name: &str) -> Option<(String, f32)> {
    let (_, n) = view.op(name, "Mul")?;
    [(0, 1), (1, 0)].into_iter().find_map(|(x, c)| Some((n.input[x].clone(), scalar(view, &n.input[c])?)))
}

/// The value of a rank-0 int64 initializer (a Gather index that drops its axis).
fn index(view: &View<'_>, name: &str) -> Option<i64> {
    let t = view.initializers.get(name).filter(|t| t.dims.is_empty())?;
    match view.ints(&t.name)?.as_slice() {
        [i] => Some(*i),
        _ => None,
    }
}

fn near(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// Rewrites every RMSNorm, tanh GELU and rotary embedding chain of `model`'s main graph (see the module docs).
pub fn rewrite(model: &mut ModelProto) -> Fused {
    let Some(graph) = model.graph.as_mut() else { return Fused::default() };
    let (fused, replace) = {
        let view = View::new(graph);
        let mut fused = Fused::default();
        let mut replace = Vec::new();
        for n in &graph.node {
            if let Some((at, node)) = rms_norm(&view, n) {
                fused.rms_norms += 1;
                replace.push((at, vec![node]));
            } else if let Some((at, node)) = gelu(&view, n) {
                fused.gelus += 1;
                replace.push((at, vec![node]));
            } else if let Some(r) = rope(&view, n) {
                fused.ropes += 1;
                replace.push(r);
            }
        }
        (fused, replace)
    };
    if replace.is_empty() {
        return fused;
    }
    // Each replacement takes the place of its chain's last node; the chain's other nodes are then unused.
    let mut at: HashMap<usize, Vec<NodeProto>> = replace.into_iter().collect();
    let old = std::mem::take(&mut graph.node);
    for (i, n) in old.into_iter().enumerate() {
        match at.remove(&i) {
            Some(nodes) => graph.node.extend(nodes),
            None => graph.node.push(n),
        }
    }
    if fused.ropes > 0 {
        graph.initializer.extend([attention::ints(ROPE_START, &[1], &[0]), attention::ints(ROPE_FLAT, &[3], &[0, 0, -1])]);
    }
    attention::prune(graph);
    if fused.gelus + fused.ropes > 0 && !model.opset_import.iter().any(|o| o.domain == MS_DOMAIN) {
        model.opset_import.push(OperatorSetIdProto { domain: MS_DOMAIN.into(), version: 1, ..Default::default() });
    }
    fused
}

/// Whether `name` is declared float32.
fn is_f32(view: &View<'_>, name: &str) -> bool {
    view.shapes.get(name).is_some_and(|s| s.elem == FLOAT)
}

/// Whether `w` is a float32 initializer of one dim, the last dim of `x` when that is known (its data may be
/// external: only its declaration is read).
fn vector_over_last(view: &View<'_>, w: &str, x: &str) -> bool {
    let last = view.shapes.get(x).and_then(|s| s.dims.last().copied().flatten());
    view.initializers.get(w).is_some_and(|t| t.data_type == FLOAT && t.dims.len() == 1 && last.is_none_or(|d| t.dims[0] == d))
}

/// The node reading `name`, when exactly one node (and no graph output) does.
fn only_consumer<'a>(view: &View<'a>, name: &str) -> Option<(usize, &'a NodeProto)> {
    if view.uses(name) != 1 {
        return None;
    }
    view.g.node.iter().enumerate().find(|(_, n)| n.input.iter().any(|i| i == name))
}

/// The other input of a two-input node `n`, given one of them.
fn other<'a>(n: &'a NodeProto, one: &str) -> Option<&'a str> {
    match n.input.as_slice() {
        [a, b] if a == one => Some(b),
        [a, b] if b == one => Some(a),
        _ => None,
    }
}

/// `Pow(x, 2)` → ReduceMean(last axis) → Add(eps) → Sqrt → Reciprocal → Mul(x) → Mul(w), anchored at the Pow:
/// the index of the last Mul and the node replacing it.
fn rms_norm(view: &View<'_>, pow: &NodeProto) -> Option<(usize, NodeProto)> {
    if pow.op_type != "Pow" || !pow.domain.is_empty() || scalar(view, pow.input.get(1)?)? != 2.0 {
        return None;
    }
    let x = pow.input[0].as_str();
    let rank = view.shapes.get(x)?.dims.len() as i64;
    if !is_f32(view, x) {
        return None;
    }
    let (_, mean) = only_consumer(view, &pow.output[0]).filter(|(_, n)| n.op_type == "ReduceMean")?;
    let keepdims = mean.attribute.iter().find(|a| a.name == "keepdims").is_none_or(|a| a.i == 1);
    let axes = match mean.input.get(1) {
        Some(a) => view.ints(a)?,
        None => mean.attribute.iter().find(|a| a.name == "axes")?.ints.clone(),
    };
    if !keepdims || (axes != [-1] && axes != [rank - 1]) {
        return None;
    }
    let (_, add) = only_consumer(view, &mean.output[0]).filter(|(_, n)| n.op_type == "Add")?;
    let eps = scalar(view, other(add, &mean.output[0])?)?;
    let (_, sqrt) = only_consumer(view, &add.output[0]).filter(|(_, n)| n.op_type == "Sqrt")?;
    let (_, recip) = only_consumer(view, &sqrt.output[0]).filter(|(_, n)| n.op_type == "Reciprocal")?;
    let (_, norm) = only_consumer(view, &recip.output[0]).filter(|(_, n)| n.op_type == "Mul")?;
    if other(norm, &recip.output[0])? != x {
        return None;
    }
    let (last, scaled) = only_consumer(view, &norm.output[0]).filter(|(_, n)| n.op_type == "Mul")?;
    let w = other(scaled, &norm.output[0])?;
    if !vector_over_last(view, w, x) {
        return None;
    }
    let mut n = attention::node(
        "SimplifiedLayerNormalization",
        &scaled.output[0],
        &[x, w],
        &[attention::attr_int("axis", -1), attention::attr_float("epsilon", eps), attention::attr_int("stash_type", 1)],
    );
    n.name = format!("qe_fuse/rms/{}", scaled.output[0]);
    Some((last, n))
}

/// `x (1 + tanh(√(2/π) (x + 0.044715 x³))) / 2` in the exported order (Pow, Mul, Add, Mul, Tanh, Add, then the
/// halving and the product with x in either order), anchored at the Tanh: the index of the last Mul and the
/// FastGelu replacing it.
fn gelu(view: &View<'_>, tanh: &NodeProto) -> Option<(usize, NodeProto)> {
    if tanh.op_type != "Tanh" || !tanh.domain.is_empty() {
        return None;
    }
    // Backwards: √(2/π) · (x + 0.044715 · x³).
    let (inner, c) = scaled(view, &tanh.input[0])?;
    let (_, sum) = view.op(&inner, "Add").filter(|_| near(c, GELU_SCALE))?;
    let (x, cubic) = [(0, 1), (1, 0)].into_iter().find_map(|(i, j)| {
        let (p, c) = scaled(view, &sum.input[j])?;
        let (_, pow) = view.op(&p, "Pow")?;
        (near(c, GELU_CUBIC) && pow.input[0] == sum.input[i] && scalar(view, &pow.input[1])? == 3.0)
            .then(|| (sum.input[i].clone(), p))
    })?;
    if !is_f32(view, &x) || [&tanh.input[0], &inner, &cubic].iter().any(|t| view.uses(t) != 1) {
        return None;
    }
    // Forwards: 1 + tanh, then · 0.5 and · x in either order, or · (0.5 · x).
    let (_, one) = only_consumer(view, &tanh.output[0]).filter(|(_, n)| n.op_type == "Add")?;
    if scalar(view, other(one, &tanh.output[0])?)? != 1.0 {
        return None;
    }
    let (i, m1) = only_consumer(view, &one.output[0]).filter(|(_, n)| n.op_type == "Mul")?;
    let f = other(m1, &one.output[0])?;
    let last = if scalar(view, f) == Some(0.5) {
        only_consumer(view, &m1.output[0]).filter(|(_, n)| n.op_type == "Mul" && other(n, &m1.output[0]) == Some(x.as_str()))?
    } else if f == x {
        only_consumer(view, &m1.output[0])
            .filter(|(_, n)| n.op_type == "Mul" && other(n, &m1.output[0]).and_then(|c| scalar(view, c)) == Some(0.5))?
    } else if scaled(view, f).is_some_and(|(y, c)| y == x && c == 0.5) && view.uses(f) == 1 {
        (i, m1)
    } else {
        return None;
    };
    // x's own uses: the cube, the sum and the product (or the halving).
    let bias = view.op(&x, "Add").filter(|_| view.uses(&x) == 3).and_then(|(_, add)| {
        [(0, 1), (1, 0)].into_iter().find_map(|(a, b)| {
            (vector_over_last(view, &add.input[b], &x) && is_f32(view, &add.input[a]))
                .then(|| [add.input[a].clone(), add.input[b].clone()])
        })
    });
    let inputs: Vec<&str> = match &bias {
        Some([a, b]) => vec![a, b],
        None => vec![&x],
    };
    let (at, out) = last;
    let mut n = attention::node("FastGelu", &out.output[0], &inputs, &[]);
    n.domain = MS_DOMAIN.into();
    n.name = format!("qe_fuse/gelu/{}", out.output[0]);
    Some((at, n))
}

/// The first position of every rotary embedding (`position_ids` of shape [1]: positions 0, 1, ... S - 1).
const ROPE_START: &str = "qe_fuse/rope_start";
/// `[0, 0, -1]`: `[B, S, N, H]` to `[B, S, N H]`.
const ROPE_FLAT: &str = "qe_fuse/rope_flat";

/// `Reshape(Concat(Unsqueeze(x0 cos - x1 sin), Unsqueeze(x0 sin + x1 cos), axis -1))` where `x0`, `x1` are the
/// pairs of `Reshape(x, [B, S, N, H/2, 2])` (Gather 0 and 1 of the last axis) and `cos`, `sin` are `[S, H/2]`
/// tables unsqueezed to `[1, S, 1, H/2]`; anchored at the Concat: the index of the last Reshape and the nodes
/// replacing it (x flattened to `[B, S, N H]`, RotaryEmbedding with interleaved pairs, the same last Reshape).
fn rope(view: &View<'_>, stack: &NodeProto) -> Option<(usize, Vec<NodeProto>)> {
    let axis = stack.attribute.iter().find(|a| a.name == "axis").map(|a| a.i);
    if stack.op_type != "Concat" || !stack.domain.is_empty() || stack.input.len() != 2 || axis != Some(-1) {
        return None;
    }
    let unsqueezed = |name: &str| {
        let (_, u) = view.op(name, "Unsqueeze").filter(|_| view.uses(name) == 1)?;
        (view.ints(u.input.get(1)?)? == [-1] && view.uses(&u.input[0]) == 1).then(|| u.input[0].clone())
    };
    let (real, imag) = (unsqueezed(&stack.input[0])?, unsqueezed(&stack.input[1])?);
    let (_, sub) = view.op(&real, "Sub")?;
    let (_, add) = view.op(&imag, "Add")?;
    // Each product is `pair · table` in either order: (which pair, the pairs tensor, the table).
    let product = |name: &str| -> Option<(i64, String, String)> {
        let (_, m) = view.op(name, "Mul").filter(|_| view.uses(name) == 1)?;
        [(0, 1), (1, 0)].into_iter().find_map(|(x, t)| {
            let (_, g) = view.op(&m.input[x], "Gather")?;
            let axis = g.attribute.iter().find(|a| a.name == "axis").map_or(0, |a| a.i);
            (axis == -1 || axis == 4).then_some(())?;
            Some((index(view, &g.input[1])?, g.input[0].clone(), m.input[t].clone()))
        })
    };
    // x0 cos - x1 sin, and x0 sin + x1 cos with its terms in either order.
    let (a, b) = (product(&sub.input[0])?, product(&sub.input[1])?);
    let (mut c, mut d) = (product(&add.input[0])?, product(&add.input[1])?);
    if c.0 == 1 {
        std::mem::swap(&mut c, &mut d);
    }
    let pairs = &a.1;
    let same_pairs = [&b, &c, &d].iter().all(|p| &p.1 == pairs);
    if (a.0, b.0, c.0, d.0) != (0, 1, 0, 1) || !same_pairs || c.2 != b.2 || d.2 != a.2 {
        return None;
    }
    // The tables: [S, H/2] unsqueezed at [0, 2].
    let table = |u: &str| {
        let (_, n) = view.op(u, "Unsqueeze")?;
        (view.ints(n.input.get(1)?)? == [0, 2]).then(|| n.input[0].clone())
    };
    let (cos, sin) = (table(&a.2)?, table(&b.2)?);
    // The pairs: x [B, S, N, H] (N and H static, float32) reshaped to [B, S, N, H/2, 2].
    let (_, reshape) = view.op(pairs, "Reshape")?;
    let x = reshape.input[0].as_str();
    let dims = &view.shapes.get(x).filter(|s| s.elem == FLOAT && s.dims.len() == 4)?.dims;
    let (heads, head) = (dims[2]?, dims[3]?);
    // The tables [S, H/2] and the pairs [B, S, N, H/2, 2] as declared (static where it matters).
    let dims_of = |name: &str| view.shapes.get(name).map(|s| s.dims.clone());
    let table_ok =
        |t: &str| view.shapes.get(t).is_some_and(|s| s.elem == FLOAT && s.dims.len() == 2 && s.dims[1] == Some(head / 2));
    let pairs_ok = dims_of(pairs).is_some_and(|d| d.len() == 5 && d[2..] == [Some(heads), Some(head / 2), Some(2)]);
    if head % 2 != 0 || !table_ok(&cos) || !table_ok(&sin) || !pairs_ok {
        return None;
    }
    let (last, out) = only_consumer(view, &stack.output[0]).filter(|(_, n)| n.op_type == "Reshape")?;
    let p = format!("qe_fuse/rope/{}", out.output[0]);
    let flat = attention::node("Reshape", &format!("{p}/x"), &[x, ROPE_FLAT], &[]);
    let inputs = [format!("{p}/x"), ROPE_START.to_string(), cos, sin];
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let mut rotary = attention::node(
        "RotaryEmbedding",
        &format!("{p}/y"),
        &inputs,
        &[attention::attr_int("interleaved", 1), attention::attr_int("num_heads", heads)],
    );
    rotary.domain = MS_DOMAIN.into();
    let mut back = attention::node("Reshape", &format!("{p}/out"), &[&format!("{p}/y"), &out.input[1]], &[]);
    back.output = out.output.clone();
    Some((last, vec![flat, rotary, back]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::attention::tests::{backend, committed, count, input, max_diff, op, run, scalar, values};
    use crate::runtime::Tensor;
    use onnx_protobuf::{GraphProto, TensorProto};

    fn floats(name: &str, v: &[f32]) -> TensorProto {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        TensorProto { name: name.into(), dims: vec![v.len() as i64], data_type: FLOAT, raw_data: raw, ..Default::default() }
    }

    fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, elem: i32, extra_outputs: &[&str]) -> ModelProto {
        // Every tensor declared, as the exporter does.
        let value_info = nodes
            .iter()
            .filter(|n| n.output[0] != "y" && !extra_outputs.contains(&n.output[0].as_str()))
            .map(|n| input(&n.output[0], elem, &["b", "s", "k"]))
            .collect();
        let mut output = vec![input("y", elem, &["b", "s", "8"])];
        output.extend(extra_outputs.iter().map(|o| input(o, elem, &["b", "s", "8"])));
        let g = GraphProto {
            name: "fuse".into(),
            node: nodes,
            initializer: inits,
            input: vec![input("h", elem, &["b", "s", "8"])],
            output,
            value_info,
            ..Default::default()
        };
        let opset = OperatorSetIdProto { domain: String::new(), version: 18, ..Default::default() };
        ModelProto { ir_version: 8, graph: Some(g).into(), opset_import: vec![opset], ..Default::default() }
    }

    /// `y = RMSNorm(h) * w` as torch exports it.
    fn rms_graph() -> ModelProto {
        let axes = attention::ints("axes", &[1], &[-1]);
        let mut mean = op("ReduceMean", "m", &["p", "axes"]);
        mean.attribute.push(attention::attr_int("keepdims", 1));
        let nodes = vec![
            op("Pow", "p", &["h", "two"]),
            mean,
            op("Add", "a", &["m", "eps"]),
            op("Sqrt", "r", &["a"]),
            op("Reciprocal", "i", &["r"]),
            op("Mul", "n", &["h", "i"]),
            op("Mul", "y", &["n", "w"]),
        ];
        let w: Vec<f32> = values(8, 9).iter().map(|v| 1.0 + v / 4.0).collect();
        model(nodes, vec![scalar("two", 2.0), axes, scalar("eps", 1e-6), floats("w", &w)], FLOAT, &[])
    }

    /// The tanh GELU of `x = h + bias`, its last two products in the order `form` says.
    fn gelu_graph(form: u8, extra_outputs: &[&str]) -> ModelProto {
        let mut nodes = vec![
            op("Add", "x", &["h", "bias"]),
            op("Pow", "p", &["x", "three"]),
            op("Mul", "q", &["cubic", "p"]),
            op("Add", "s", &["x", "q"]),
            op("Mul", "u", &["s", "scale"]),
            op("Tanh", "t", &["u"]),
            op("Add", "o", &["t", "one"]),
        ];
        nodes.extend(match form {
            0 => [op("Mul", "hh", &["half", "o"]), op("Mul", "y", &["x", "hh"])],
            1 => [op("Mul", "hh", &["o", "x"]), op("Mul", "y", &["hh", "half"])],
            _ => [op("Mul", "hh", &["x", "half"]), op("Mul", "y", &["hh", "o"])],
        });
        let inits = vec![
            floats("bias", &values(8, 5)),
            scalar("three", 3.0),
            scalar("cubic", GELU_CUBIC),
            scalar("scale", GELU_SCALE),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ];
        model(nodes, inits, FLOAT, extra_outputs)
    }

    fn feeds() -> Vec<(&'static str, Tensor)> {
        vec![("h", Tensor::f32(&[2, 5, 8], values(80, 3).iter().map(|v| v * 2.0).collect()))]
    }

    #[test]
    fn an_rms_norm_chain_becomes_one_node_and_computes_the_same() {
        let plain = rms_graph();
        let mut m = plain.clone();
        assert_eq!(rewrite(&mut m), Fused { rms_norms: 1, ..Default::default() });
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node.iter().map(|n| n.op_type.as_str()).collect::<Vec<_>>(), ["SimplifiedLayerNormalization"]);
        let d = max_diff(&run(&plain, false, &feeds()), &run(&plain, true, &feeds()));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn each_order_of_the_tanh_gelu_becomes_fast_gelu_with_its_bias() {
        for form in 0..3 {
            let plain = gelu_graph(form, &[]);
            let mut m = plain.clone();
            assert_eq!(rewrite(&mut m), Fused { gelus: 1, ..Default::default() }, "form {form}");
            let g = m.graph.as_ref().unwrap();
            assert_eq!(g.node.len(), 1, "form {form}: {:?}", g.node);
            assert_eq!((g.node[0].op_type.as_str(), g.node[0].domain.as_str()), ("FastGelu", MS_DOMAIN));
            assert_eq!(g.node[0].input, ["h", "bias"], "form {form}: the bias Add goes in");
            assert!(m.opset_import.iter().any(|o| o.domain == MS_DOMAIN));
            let d = max_diff(&run(&plain, false, &feeds()), &run(&plain, true, &feeds()));
            assert!(d < 1e-5, "form {form}: {d}");
        }
    }

    #[test]
    fn chains_read_elsewhere_or_not_float32_are_left_as_exported() {
        // The tanh is also a graph output: the chain cannot go.
        let mut m = gelu_graph(0, &["t"]);
        let before = m.clone();
        assert_eq!(rewrite(&mut m), Fused::default());
        assert_eq!(m, before);
        // x is also a graph output: the GELU fuses, its bias Add stays.
        let mut m = gelu_graph(0, &["x"]);
        assert_eq!(rewrite(&mut m).gelus, 1);
        let fast = m.graph.as_ref().unwrap().node.iter().find(|n| n.op_type == "FastGelu").unwrap();
        assert_eq!(fast.input, ["x"]);
        // Another constant: not this GELU.
        let mut m = gelu_graph(0, &[]);
        m.graph.as_mut().unwrap().initializer[3] = scalar("cubic", 0.05);
        assert_eq!(rewrite(&mut m), Fused::default());
        // float16 declared: left alone (the CPU kernels here are float32).
        let mut m = rms_graph();
        for v in &mut m.graph.as_mut().unwrap().input {
            *v = input(&v.name, 10, &["b", "s", "8"]);
        }
        assert_eq!(rewrite(&mut m), Fused::default());
    }

    /// `y = RoPE(x)` as torch exports the transformer's (x `[b, s, 2, 8]`: two heads of 8, tables `[s, 4]`);
    /// `swap_sum`: the imaginary part's terms the other way round; `swap_diff`: `x1 sin - x0 cos` (not RoPE).
    fn rope_graph(swap_sum: bool, swap_diff: bool) -> ModelProto {
        let gather = |out: &str, i: &str| {
            let mut g = op("Gather", out, &["pairs", i]);
            g.attribute.push(attention::attr_int("axis", 4));
            g
        };
        let mut concat = op("Concat", "st", &["u0", "u1"]);
        concat.attribute.push(attention::attr_int("axis", -1));
        let nodes = vec![
            op("Reshape", "pairs", &["x", "shape5"]),
            gather("x0", "i0"),
            gather("x1", "i1"),
            op("Unsqueeze", "cu", &["cos", "axes02"]),
            op("Unsqueeze", "su", &["sin", "axes02"]),
            op("Mul", "m1", &["x0", "cu"]),
            op("Mul", "m2", &["su", "x1"]),
            if swap_diff { op("Sub", "re", &["m2", "m1"]) } else { op("Sub", "re", &["m1", "m2"]) },
            op("Mul", "m3", &["x0", "su"]),
            op("Mul", "m4", &["x1", "cu"]),
            if swap_sum { op("Add", "im", &["m4", "m3"]) } else { op("Add", "im", &["m3", "m4"]) },
            op("Unsqueeze", "u0", &["re", "axes_last"]),
            op("Unsqueeze", "u1", &["im", "axes_last"]),
            concat,
            op("Reshape", "y", &["st", "shape4"]),
        ];
        let inits = vec![
            attention::ints("shape5", &[5], &[0, 0, 2, 4, 2]),
            attention::ints("shape4", &[4], &[0, 0, 2, 8]),
            attention::ints("i0", &[], &[0]),
            attention::ints("i1", &[], &[1]),
            attention::ints("axes02", &[2], &[0, 2]),
            attention::ints("axes_last", &[1], &[-1]),
        ];
        let four = |n: &str| input(n, FLOAT, &["b", "s", "2", "4"]);
        let mut value_info =
            vec![input("pairs", FLOAT, &["b", "s", "2", "4", "2"]), input("st", FLOAT, &["b", "s", "2", "4", "2"])];
        value_info.extend(["x0", "x1", "m1", "m2", "m3", "m4", "re", "im"].map(four));
        value_info.extend(["cu", "su"].map(|n| input(n, FLOAT, &["1", "s", "1", "4"])));
        value_info.extend(["u0", "u1"].map(|n| input(n, FLOAT, &["b", "s", "2", "4", "1"])));
        let g = GraphProto {
            name: "rope".into(),
            node: nodes,
            initializer: inits,
            input: vec![
                input("x", FLOAT, &["b", "s", "2", "8"]),
                input("cos", FLOAT, &["s", "4"]),
                input("sin", FLOAT, &["s", "4"]),
            ],
            output: vec![input("y", FLOAT, &["b", "s", "2", "8"])],
            value_info,
            ..Default::default()
        };
        let opset = OperatorSetIdProto { domain: String::new(), version: 18, ..Default::default() };
        ModelProto { ir_version: 8, graph: Some(g).into(), opset_import: vec![opset], ..Default::default() }
    }

    #[test]
    fn a_rotary_embedding_becomes_one_node_and_computes_the_same() {
        let angles = values(12, 4);
        let feeds = vec![
            ("x", Tensor::f32(&[2, 3, 2, 8], values(96, 8))),
            ("cos", Tensor::f32(&[3, 4], angles.iter().map(|a| a.cos()).collect())),
            ("sin", Tensor::f32(&[3, 4], angles.iter().map(|a| a.sin()).collect())),
        ];
        for swap_sum in [false, true] {
            let plain = rope_graph(swap_sum, false);
            let mut m = plain.clone();
            assert_eq!(rewrite(&mut m), Fused { ropes: 1, ..Default::default() });
            let ops: Vec<&str> = m.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["Reshape", "RotaryEmbedding", "Reshape"]);
            let d = max_diff(&run(&plain, false, &feeds), &run(&plain, true, &feeds));
            assert!(d < 1e-5, "{d}");
        }
        // x1 sin - x0 cos is not a rotation: left as exported.
        let mut m = rope_graph(false, true);
        assert_eq!(rewrite(&mut m), Fused::default());
    }

    /// Every RMSNorm, tanh GELU and RoPE of the committed float32 graphs is fused (none of their nodes is left). In
    /// the 16-bit graphs (for TensorRT) only the RoPEs are float32 (the model casts q and k up before them): those
    /// fuse, the 16-bit norms and GELUs stay as exported.
    #[test]
    fn committed_graphs_fuse_every_rms_norm_gelu_and_rope() {
        for bundle in ["tiny", "tiny-2509", "tiny-2511", "tiny-fp8", "tiny-fp16", "tiny-bf16"] {
            let sixteen = bundle.ends_with("16");
            for (component, want) in [
                ("transformer", Fused { rms_norms: 9, gelus: 3, ropes: 8 }),
                ("text_encoder", Fused { rms_norms: 14, gelus: 0, ropes: 0 }),
            ] {
                let (_, mut m) = committed(bundle, component);
                let got = rewrite(&mut m);
                if sixteen {
                    assert_eq!(got, Fused { ropes: want.ropes, ..Default::default() }, "{bundle}/{component}");
                    continue;
                }
                assert_eq!(got, want, "{bundle}/{component}");
                for gone in ["Pow", "Tanh", "Reciprocal", "Sqrt", "ReduceMean", "Sub"] {
                    assert_eq!(count(&m, gone), 0, "{bundle}/{component}: {gone} left");
                }
            }
        }
    }

    /// The engine applies the rewrite to the transformer only (runtime::ort): the text encoder loads as exported.
    #[test]
    fn sessions_fuse_the_transformer_only() {
        for (component, want) in [("transformer", Fused { rms_norms: 9, gelus: 3, ropes: 8 }), ("text_encoder", Fused::default())]
        {
            let (path, _) = committed("tiny", component);
            let engine = backend(false).load(component, &path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(engine.fused(), want, "{component}");
        }
    }
}
