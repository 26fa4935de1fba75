//! Ring hot paths: parsing one request slot, and draining a full ring (take + parse + respond
//! + publish), which is what the dataplane thread does per wake-up.
//!
//! `cargo bench --bench ring`; the figure and the command are recorded in docs/performance.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rbdback::ring::front::{indirect_pages, MockFrontend, WireRequest};
use rbdback::ring::{Abi, BackRing, Limits, Parsed, RequestSlot, Segment, Status};
use rbdback::shm::SharedMem;

const CAPACITY: u64 = 1 << 31; // 1 TiB in sectors

fn page(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

fn bench_parse(c: &mut Criterion) {
    let limits = Limits::new(CAPACITY);
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    for abi in [Abi::X86_64, Abi::X86_32] {
        let read = WireRequest::read(7, 4096, vec![page(1)]).encode(abi);
        g.bench_with_input(BenchmarkId::new("read_4k", abi), &read, |b, bytes| {
            b.iter(|| {
                let slot = RequestSlot::from_bytes(abi, black_box(bytes));
                black_box(slot.parse(&limits))
            })
        });
        let write = WireRequest::write(7, 4096, (0..11).map(page).collect()).encode(abi);
        g.bench_with_input(BenchmarkId::new("write_44k", abi), &write, |b, bytes| {
            b.iter(|| {
                let slot = RequestSlot::from_bytes(abi, black_box(bytes));
                black_box(slot.parse(&limits))
            })
        });
    }
    let abi = Abi::X86_64;
    let ind = WireRequest::Indirect {
        indirect_op: 1,
        nr_segments: 256,
        id: 9,
        sector: 0,
        grefs: vec![100],
    }
    .encode(abi);
    let pages = indirect_pages(&(0..256).map(page).collect::<Vec<_>>());
    let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
    g.bench_function("indirect_1m_256_segments", |b| {
        b.iter(|| {
            let slot = RequestSlot::from_bytes(abi, black_box(&ind));
            match slot.parse(&limits) {
                Ok(Parsed::NeedsIndirectPages(i)) => black_box(i.complete(&refs, &limits)).is_ok(),
                _ => false,
            }
        })
    });
    g.finish();
}

/// One ring's worth of 4 KiB reads: fill (untimed), then time take + parse + respond +
/// publish, then let the frontend consume the responses (untimed).
fn bench_drain(c: &mut Criterion) {
    let limits = Limits::new(CAPACITY);
    let mut g = c.benchmark_group("drain_respond");
    for (abi, order) in [(Abi::X86_64, 0u8), (Abi::X86_64, 4), (Abi::X86_32, 4)] {
        let mut buf = vec![0u8; 4096 << order];
        let mem = SharedMem::from_mut_slice(&mut buf);
        let mut front = MockFrontend::new(abi, order).unwrap();
        let mut back = BackRing::new(abi, order).unwrap();
        front.init_shared(&mem).unwrap();
        let cap = back.capacity();
        let reqs: Vec<[u8; 112]> = (0..u64::from(cap))
            .map(|i| WireRequest::read(i, i * 8, vec![page(u32::try_from(i).unwrap())]).encode(abi))
            .collect();
        let mut slots = Vec::with_capacity(cap as usize);
        let mut rsps = Vec::with_capacity(cap as usize);
        g.throughput(Throughput::Elements(u64::from(cap)));
        g.bench_function(
            BenchmarkId::new(format!("{abi}"), format!("order{order}_{cap}x4k")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        for r in &reqs {
                            front.queue_raw(&mem, r).unwrap();
                        }
                        front.push_requests(&mem).unwrap();
                        let t0 = Instant::now();
                        slots.clear();
                        back.take_requests(&mem, &mut slots, usize::MAX).unwrap();
                        for s in slots.drain(..) {
                            let rsp = match s.parse(&limits) {
                                Ok(Parsed::Ready(r)) => r.response(Status::Okay),
                                Ok(Parsed::NeedsIndirectPages(_)) => {
                                    unreachable!("direct reads only")
                                }
                                Err(rej) => rej.response(),
                            };
                            back.push_response(&mem, &rsp).unwrap();
                        }
                        black_box(back.publish_responses(&mem).unwrap());
                        total += t0.elapsed();
                        rsps.clear();
                        front.take_responses(&mem, &mut rsps).unwrap();
                        assert_eq!(rsps.len(), cap as usize);
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_parse, bench_drain);
criterion_main!(benches);
