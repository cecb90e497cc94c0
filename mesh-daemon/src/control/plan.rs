//! Planning a write: a pure function of the accepted state and an edit.

use super::*;

/// A write checked, not yet applied.
#[derive(Debug)]
pub struct Planned {
    pub stored: Stored,
    pub state: State,
    /// The frontends of `state`: those of the state before when the write
    /// left every service port where it was.
    pub frontends: Option<Arc<Vec<model::Frontend>>>,
    pub changes: Changes,
    /// What the write does to the index of the state before.
    pub index_change: Index,
}

/// The pure part of a write: checks the generation, applies `edit` to a
/// copy of the document (a copy of pointers: services are shared),
/// validates what changed against `prev`'s index, checks the maps' room
/// and assigns ids. `prev` is never changed.
pub fn plan(
    prev: (&Stored, &State, &Index),
    if_match: Option<u64>,
    node: &NodeName,
    capacity: &MapCapacity,
    edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
) -> Result<Planned, WriteError> {
    let (current, prev_state, index) = prev;
    if let Some(expected) = if_match {
        if expected != current.generation {
            return Err(WriteError::Conflict { current: current.generation, expected });
        }
    }
    let mut doc = current.state.clone();
    edit(&mut doc)?;
    let v = State::from_changes((&current.state, prev_state, index), &doc, capacity.slot_table_size)
        .map_err(WriteError::Invalid)?;
    let (state, changes, index_change) = (v.state, v.changes, v.index_change);
    for &i in &changes.changed {
        doc.shrink(i);
    }
    let workloads = state.workloads.iter().filter(|w| &w.node == node).count();
    let needs = if changes.whole {
        MapNeeds::of(&state, node, capacity.slot_table_size)
    } else {
        MapNeeds::after(index, &index_change, workloads)
    };
    needs.check(capacity).map_err(WriteError::Invalid)?;
    // Every service port where it was (services replaced in place, with
    // the same name, VIP and ports): the ids and frontends stay.
    let in_place = !changes.whole
        && changes.changed.len() == changes.removed.len()
        && changes.changed.iter().zip(&changes.removed).all(|(i, (j, old))| {
            let new = &state.services[*i];
            i == j
                && (&new.namespace, &new.name, new.vips, &new.ports)
                    == (&old.namespace, &old.name, old.vips, &old.ports)
        });
    let (ids, frontends) = if in_place {
        (current.ids.clone(), None)
    } else {
        let ids = Arc::new(current.ids.assign(&state.frontend_keys()));
        let frontends = Arc::new(state.frontends(&ids));
        (ids, Some(frontends))
    };
    let stored = Stored { generation: current.generation + 1, ids, state: doc };
    Ok(Planned { stored, state, frontends, changes, index_change })
}
