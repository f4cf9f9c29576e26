//! Generating inputs: proptest strategies for CONNECTs, packets and
//! admin requests, and mutations of corpus inputs.

use super::*;

pub(super) fn topic() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"devices/fz/good0/t".to_vec()),
        Just(b"devices/fz/good1/t".to_vec()),
        Just(b"devices/fz/other/t".to_vec()),
        Just(b"devices/fz/good0/#".to_vec()),
        Just(b"devices/#".to_vec()),
        Just(b"#".to_vec()),
        Just(b"+/+/+".to_vec()),
        Just(b"admin/v1/admin/request".to_vec()),
        Just(b"admin/#".to_vec()),
        Just(b"$SYS/#".to_vec()),
        Just(b"$share/g/devices/fz/good0/t".to_vec()),
        Just(b"a/#/b".to_vec()),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

pub(super) fn with_len(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

pub(super) fn props(v5: bool) -> BoxedStrategy<Vec<u8>> {
    if !v5 {
        return Just(Vec::new()).boxed();
    }
    prop_oneof![
        4 => Just(vec![0]),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(|p| {
            let mut out = Vec::new();
            remaining_length(p.len(), &mut out);
            out.extend(p);
            out
        }),
        1 => (1u16..40).prop_map(|alias| {
            let mut out = vec![3, 0x23];
            out.extend(alias.to_be_bytes());
            out
        }),
    ]
    .boxed()
}

/// One client packet, mostly well-formed.
pub(super) fn client_packet(v5: bool) -> BoxedStrategy<Vec<u8>> {
    let publish = (
        0u8..16,
        topic(),
        any::<u16>(),
        props(v5),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(flags, t, id, p, payload)| {
            let mut body = with_len(&t);
            if (flags >> 1) & 3 != 0 {
                body.extend(id.to_be_bytes());
            }
            body.extend(p);
            body.extend(payload);
            packet(0x30 | flags, &body)
        });
    let subscribe = (
        any::<u16>(),
        props(v5),
        proptest::collection::vec((topic(), any::<u8>()), 0..4),
    )
        .prop_map(|(id, p, filters)| {
            let mut body = id.to_be_bytes().to_vec();
            body.extend(p);
            for (f, o) in filters {
                body.extend(with_len(&f));
                body.push(o);
            }
            packet(0x82, &body)
        });
    let unsubscribe = (
        any::<u16>(),
        props(v5),
        proptest::collection::vec(topic(), 0..3),
    )
        .prop_map(|(id, p, filters)| {
            let mut body = id.to_be_bytes().to_vec();
            body.extend(p);
            for f in filters {
                body.extend(with_len(&f));
            }
            packet(0xA2, &body)
        });
    let ack = (
        prop_oneof![Just(0x40u8), Just(0x50), Just(0x62), Just(0x70)],
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(t, id, extra)| {
            let mut body = id.to_be_bytes().to_vec();
            body.extend(extra);
            packet(t, &body)
        });
    let simple = prop_oneof![
        Just(vec![0xC0, 0x00]),
        Just(vec![0xE0, 0x00]),
        Just(vec![0xE0, 0x02, 0x04, 0x00]),
        Just(vec![0xF0, 0x00]),
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(b, body)| packet(b, &body)),
    ];
    prop_oneof![4 => publish, 3 => subscribe, 1 => unsubscribe, 2 => ack, 2 => simple].boxed()
}

pub(super) fn packets_input() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => any::<bool>().prop_flat_map(|v5| {
            proptest::collection::vec(client_packet(v5), 0..6).prop_map(move |ps| {
                let mut out = vec![u8::from(v5)];
                out.extend(ps.concat());
                out
            })
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ]
    .boxed()
}

pub(super) fn connect_input() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut v| {
            // Raw mode starting with a CONNECT header byte.
            v.insert(0, 0);
            v.insert(1, 0x10);
            v
        }),
    ]
    .boxed()
}

pub(super) fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(100),
            Just(1_000_000_000),
            Just(u64::MAX)
        ]
        .prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        prop_oneof![
            Just("fz".to_string()),
            Just("p2".to_string()),
            Just("product-secret".to_string()),
            Just("device-secret".to_string()),
            Just("".to_string()),
            "[a-zA-Z0-9_:&.-]{0,40}",
            ".{0,20}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::vec((field_name(), inner), 0..6)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

pub(super) fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("product_key"),
        Just("name"),
        Just("auth_mode"),
        Just("device_keys"),
        Just("order_id"),
        Just("quantity"),
        Just("validity_secs"),
        Just("enabled"),
        Just("device_key"),
        Just("Action"),
        Just("PageSize"),
        Just("RequestId"),
        Just("ProductKey"),
        Just("DeviceKey"),
        Just("DeviceKeys"),
        Just("Quantity"),
        Just("ValiditySeconds"),
        Just("PageNumber"),
        Just("Confirm"),
        Just("DryRun"),
        Just("Enabled"),
        Just("Name"),
        Just("AuthMode"),
        Just("OrderId"),
        Just("WithinDays"),
        Just("ClientToken"),
        Just("ActivateFrom"),
        Just("ExpireTo"),
    ]
    .prop_map(String::from)
    .boxed()
    .prop_union("[a-zA-Z_]{0,12}".boxed())
}

/// A SPEC §4 request with arbitrary parameter values, or any JSON.
pub(super) fn admin_input() -> BoxedStrategy<Vec<u8>> {
    let variant = proptest::sample::select(
        activation_broker::admin::ACTIONS
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>(),
    );
    let shaped = (
        variant,
        proptest::collection::vec((field_name(), json_value()), 0..7),
    )
        .prop_map(|(v, kv)| {
            let mut body: serde_json::Map<String, serde_json::Value> = kv.into_iter().collect();
            body.insert("Action".into(), v.into());
            serde_json::to_vec(&body).unwrap_or_default()
        });
    prop_oneof![
        6 => shaped,
        2 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => (1usize..5000).prop_map(|depth| {
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(depth));
            s.into_bytes()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..100),
    ]
    .boxed()
}

pub(super) fn mutate(rng: &mut rand::rngs::StdRng, corpus: &[Vec<u8>], base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.gen_range(1..=6) {
        let len = v.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = rng.gen();
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..16);
                let ins: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                v.splice(i..i, ins);
            }
            3 if len > 1 => {
                let i = rng.gen_range(0..len);
                let j = rng.gen_range(i..=len.min(i + 32));
                v.drain(i..j);
            }
            4 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, 0x10, 0x30][rng.gen_range(0..8)];
            }
            5 if len > 1 => {
                let i = rng.gen_range(0..len);
                let j = rng.gen_range(i..=len.min(i + 32));
                let dup = v[i..j].to_vec();
                v.splice(j..j, dup);
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.gen_range(0..corpus.len())];
                let cut = rng.gen_range(0..=v.len());
                let from = rng.gen_range(0..=other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => v.truncate(rng.gen_range(0..len)),
            _ => v.push(rng.gen()),
        }
    }
    v.truncate(4096);
    v
}
