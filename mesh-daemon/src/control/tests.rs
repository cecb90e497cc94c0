use super::*;
use crate::model::parse_document;

fn node() -> NodeName {
    NodeName::parse("a").unwrap()
}

fn stored() -> Stored {
    let doc = parse_document(
        "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, node: a}]}\n",
    )
    .unwrap();
    let state = State::from_document(&doc).unwrap();
    Stored { generation: 4, ids: Arc::new(model::ServiceIds::default().assign(&state.frontend_keys())), state: doc }
}

/// [`plan`] on `cur`, with its state and index made here.
fn plan_on(
    cur: &Stored,
    if_match: Option<u64>,
    capacity: &MapCapacity,
    edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
) -> Result<Planned, WriteError> {
    let state = State::from_document(&cur.state).unwrap();
    let index = Index::of(&state, capacity.slot_table_size);
    plan((cur, &state, &index), if_match, &node(), capacity, edit)
}

#[test]
fn a_batch_with_one_bad_endpoint_changes_nothing() {
    let cur = stored();
    let before = cur.clone();
    let batch = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a}]}\n\
             \x20- {name: api, vip: 10.96.0.11, ports: [{port: 80}], endpoints: [{ip: 10.0.0.300, node: a}]}\n",
        )
        .unwrap();
    let e = plan_on(&cur, None, &MapCapacity::default(), |d| {
        *d = batch;
        Ok(())
    })
    .unwrap_err();
    match e {
        WriteError::Invalid(v) => {
            assert_eq!(v.0.len(), 1, "{v}");
            assert_eq!(v.0[0].path, "services[1].endpoints[0].ip");
        }
        other => panic!("expected a validation error, got {other}"),
    }
    assert_eq!(cur, before);
}

#[test]
fn a_stale_generation_conflicts_and_the_current_one_applies() {
    let cur = stored();
    let e = plan_on(&cur, Some(3), &MapCapacity::default(), |_| Ok(())).unwrap_err();
    assert!(matches!(e, WriteError::Conflict { current: 4, expected: 3 }), "{e}");
    assert!(e.to_string().contains("generation 4, not 3"), "{e}");
    let next = plan_on(&cur, Some(4), &MapCapacity::default(), |d| {
        Arc::make_mut(&mut d.services[0]).endpoints[0].weight = 7;
        Ok(())
    })
    .unwrap()
    .stored;
    assert_eq!(next.generation, 5);
    assert_eq!(next.state.services[0].endpoints[0].weight, 7);
    assert_eq!(next.ids, cur.ids, "same service ports keep their ids");
    let unconditional = plan_on(&cur, None, &MapCapacity::default(), |_| Ok(())).unwrap().stored;
    assert_eq!(unconditional.generation, 5);
}

#[test]
fn an_edit_error_is_returned_as_is() {
    let e = plan_on(&stored(), None, &MapCapacity::default(), |_| {
        Err(WriteError::NotFound("service x/y not found".into()))
    })
    .unwrap_err();
    assert_eq!(e.to_string(), "service x/y not found");
}
