//! `validate_identity`, `peek_header` on a refused region, and the mutator reaching every structural check.

use super::*;

#[test]
fn validate_identity_compares_base_idrs_and_iidr_only() {
    let a = identity(0x0905_0000);
    assert_eq!(validate_identity(&a, &a), Ok(()));
    let mut b = a;
    b.strtab_base = 0x5000_0000;
    b.strtab_sid_bits = 8;
    b.strtab_format = 0;
    assert_eq!(validate_identity(&a, &b), Ok(()));
    b.idr[3] = 0x1415;
    let e = validate_identity(&a, &b).unwrap_err();
    assert_eq!(
        e,
        HandoverError::IdentityMismatch {
            what: "IDR3",
            recorded: 0x1414,
            probed: 0x1415
        }
    );
    assert!(e.to_string().contains("IDR3 recorded 0x1414, probed 0x1415"), "{e}");
    let mut c = a;
    c.base = 0x0906_0000;
    assert!(matches!(
        validate_identity(&a, &c),
        Err(HandoverError::IdentityMismatch {
            what: "register base",
            ..
        })
    ));
    let mut d = a;
    d.iidr = 0;
    assert!(matches!(
        validate_identity(&a, &d),
        Err(HandoverError::IdentityMismatch { what: "IIDR", .. })
    ));
}

#[test]
fn peek_header_reads_a_refused_region() {
    let mut bytes = encode_vec(&fixture(), 42);
    bytes[300] ^= 0xff;
    let h = peek_header(&bytes).unwrap();
    assert_eq!((h.magic, h.version, h.generation), (MAGIC, VERSION, 42));
    assert_eq!(
        (h.instance_count, h.record_count, h.total_len),
        (2, 5, sample::with_views(&fixture(), region_size) as u64)
    );
    assert_eq!((h.region, h.pool), (REGION, POOL));
    assert!(matches!(decode(&bytes, POOL), Err(HandoverError::BadCrc { .. })));
    assert!(matches!(
        peek_header(&bytes[..95]),
        Err(HandoverError::Truncated { needed: 96, have: 95 })
    ));
}

#[test]
fn the_mutator_reaches_the_structural_checks() {
    let mut rng = Rng::new(1);
    let mut buf = vec![0u8; sample::BUFFER_SIZE];
    let (mut crc, mut other, mut accepted) = (0, 0, 0);
    for _ in 0..3000 {
        let instances = sample::instances(&mut rng, 6);
        let n = sample::encode_owned(&instances, 1, REGION, POOL, &mut buf).unwrap();
        let donor = buf[..n].to_vec();
        let len = sample::mutate(&mut buf, n, &donor, &mut rng);
        match decode(&buf[..len], POOL) {
            Ok(d) => {
                accepted += 1;
                sample::check_accepted(&d, POOL).unwrap();
            }
            Err(HandoverError::BadCrc { .. }) => crc += 1,
            Err(_) => other += 1,
        }
    }
    assert!(other > crc, "structural {other}, CRC {crc}");
    assert!(accepted > 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever `decode` accepts (valid samples and their mutations, CRC fixed up or not) has every table, CD
    /// table and extent inside the pool.
    #[test]
    fn accepted_regions_stay_inside_the_pool(seed in proptest::prelude::any::<u64>(), rounds in 0usize..4) {
        let mut rng = Rng::new(seed);
        let instances = sample::instances(&mut rng, 8);
        let mut buf = vec![0u8; sample::BUFFER_SIZE];
        let mut len = sample::encode_owned(&instances, seed, REGION, POOL, &mut buf).unwrap();
        let donor = buf[..len].to_vec();
        for _ in 0..rounds {
            len = sample::mutate(&mut buf, len, &donor, &mut rng);
        }
        if let Ok(d) = decode(&buf[..len], POOL) {
            proptest::prop_assert_eq!(sample::check_accepted(&d, POOL), Ok(()));
            if rounds == 0 {
                proptest::prop_assert_eq!(sample::owned(&d), instances.clone());
            }
        } else {
            proptest::prop_assert!(rounds > 0, "a valid sample was refused");
        }
    }

    /// Arbitrary bytes behind a valid magic and version never panic the decoder.
    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), seal: bool) {
        if bytes.len() >= 12 {
            bytes[..8].copy_from_slice(&MAGIC);
            bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        if seal {
            sample::reseal(&mut bytes);
        }
        if let Ok(d) = decode(&bytes, POOL) {
            proptest::prop_assert_eq!(sample::check_accepted(&d, POOL), Ok(()));
        }
    }
}
