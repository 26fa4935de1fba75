//! The XenbusState handshake of one VBD, as a pure state machine.
//!
//! Owns: deciding what the backend does when the frontend's state (or the toolstack's `online`
//! flag) changes — advertise features, connect the rings, disconnect, close, reconnect.
//! Trusts: nothing: the frontend's `state` node is parsed into a total [`XenbusState`] and any
//! value, order, repetition or skipped step yields a defined action list.
//! Must never: touch xenstore or memory itself (the control thread executes the [`Action`]s),
//! so the protocol can be tested without Xen.
//!
//! Protocol (Xen's `xen/include/public/io/xenbus.h`, Linux `xen-blkback/xenbus.c`):
//! - backend probe: write the probe-time features, then `InitWait`;
//! - frontend `Initialised` or `Connected`: read its ring nodes, map, then `Connected`;
//! - frontend `Closing`: disconnect, `Closing`; frontend `Closed`: disconnect, `Closed`, and
//!   if the toolstack set `online` to 0, the device is gone;
//! - frontend back to `Initialising`/`InitWait` after `Closed`: a reboot or reconnect, so the
//!   backend advertises again and waits.

/// A xenbus state (`enum xenbus_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    /// 0
    Unknown,
    /// 1
    Initialising,
    /// 2
    InitWait,
    /// 3
    Initialised,
    /// 4
    Connected,
    /// 5
    Closing,
    /// 6
    Closed,
    /// 7
    Reconfiguring,
    /// 8
    Reconfigured,
}

impl XenbusState {
    /// Parses a `state` node. Anything that is not one of the nine values is `Unknown`.
    pub fn parse(s: &str) -> XenbusState {
        match s.trim().parse::<u32>() {
            Ok(1) => XenbusState::Initialising,
            Ok(2) => XenbusState::InitWait,
            Ok(3) => XenbusState::Initialised,
            Ok(4) => XenbusState::Connected,
            Ok(5) => XenbusState::Closing,
            Ok(6) => XenbusState::Closed,
            Ok(7) => XenbusState::Reconfiguring,
            Ok(8) => XenbusState::Reconfigured,
            _ => XenbusState::Unknown,
        }
    }

    /// The number written to xenstore.
    pub fn as_u32(self) -> u32 {
        match self {
            XenbusState::Unknown => 0,
            XenbusState::Initialising => 1,
            XenbusState::InitWait => 2,
            XenbusState::Initialised => 3,
            XenbusState::Connected => 4,
            XenbusState::Closing => 5,
            XenbusState::Closed => 6,
            XenbusState::Reconfiguring => 7,
            XenbusState::Reconfigured => 8,
        }
    }
}

impl std::fmt::Display for XenbusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u32())
    }
}

/// What the control thread must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the probe-time feature nodes (`feature-max-indirect-segments`,
    /// `multi-queue-max-queues`, `max-ring-page-order`, ...).
    Advertise,
    /// Read the frontend's ring nodes, map the rings, bind the event channels, start the
    /// queues and write the connect-time nodes (`sectors`, `info`, features) in one transaction.
    Connect,
    /// Stop the queues (bounded drain), unmap the rings, unbind the event channels.
    Disconnect,
    /// Write this value to the backend's `state` node.
    SwitchState(XenbusState),
    /// The device was removed by the toolstack: release everything and forget the VBD.
    Remove,
}

/// The backend side of one VBD's handshake.
///
/// It acts on frontend state *changes*, as Linux blkback's `frontend_changed` watch callback
/// does: the control thread may call [`Handshake::frontend_changed`] with the same value many
/// times, and only a new value does something. That matters after the backend closed on its
/// own (a connect that failed, a frontend that broke the ring): the frontend's `state` still
/// says Connected until it reacts, and connecting again on that stale value is exactly what
/// drives Linux blkfront into `BUG()` (`talk_to_blkback` on rings it still holds).
#[derive(Debug, Clone)]
pub struct Handshake {
    state: XenbusState,
    connected: bool,
    /// The frontend state last acted upon (`None`: none yet).
    last_fe: Option<XenbusState>,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A backend that has not probed yet.
    pub fn new() -> Self {
        Handshake {
            state: XenbusState::Initialising,
            connected: false,
            last_fe: None,
        }
    }

    /// A backend taking over a VBD a previous instance of itself connected, whose rings it
    /// has resumed: Connected, with nothing to write (the frontend must see no change). A
    /// frontend that moved on while no backend listened (it is closing) is then followed as
    /// if the change came now.
    pub fn resumed(frontend: XenbusState) -> Self {
        let moved_on = matches!(
            frontend,
            XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown
        );
        Handshake {
            state: XenbusState::Connected,
            connected: true,
            last_fe: if moved_on {
                Some(XenbusState::Connected)
            } else {
                Some(frontend)
            },
        }
    }

    /// A backend taking over a VBD whose backend `state` node already says `state` (a
    /// previous instance wrote it) and whose frontend is in `frontend`: it continues from
    /// there without writing anything, so the frontend sees no step backwards.
    pub fn adopt(state: XenbusState, frontend: XenbusState) -> Self {
        // What the previous instance would still have had to do: follow a frontend that
        // closed, or one that starts over after Closed. Anything else (a Connected frontend
        // that has not yet seen our Closing) is old news.
        let pending = matches!(
            (state, frontend),
            (
                XenbusState::Closing,
                XenbusState::Closed | XenbusState::Unknown
            ) | (
                XenbusState::Closed,
                XenbusState::Initialising | XenbusState::InitWait | XenbusState::Initialised
            )
        );
        Handshake {
            state,
            connected: false,
            last_fe: if pending { None } else { Some(frontend) },
        }
    }

    /// The backend's current state.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// Whether the rings are mapped and the queues run.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn switch(&mut self, to: XenbusState, out: &mut Vec<Action>) {
        if self.state != to {
            self.state = to;
            out.push(Action::SwitchState(to));
        }
    }

    fn disconnect(&mut self, out: &mut Vec<Action>) {
        if self.connected {
            self.connected = false;
            out.push(Action::Disconnect);
        }
    }

    /// The probe: advertise and wait for the frontend (`InitWait`), as blkback's probe does
    /// before it knows its disk. A frontend already Connected (a previous backend connected
    /// it and cannot be resumed) must never see `InitWait`: the VBD is closed instead, once.
    ///
    /// Any other frontend state is left for [`Self::frontend_changed`] to act on: a frontend
    /// already Initialised (a previous backend died after InitWait) is connected once the
    /// disk is ready, not taken as seen.
    pub fn probe(&mut self, frontend: XenbusState) -> Vec<Action> {
        if frontend == XenbusState::Connected {
            self.last_fe = Some(frontend);
            return self.connect_failed();
        }
        let mut out = vec![Action::Advertise];
        self.switch(XenbusState::InitWait, &mut out);
        out
    }

    /// The connect step failed (bad ring refs, absurd order, mapping error) or the disk
    /// cannot be served (its image did not open): the caller has written the reason to the
    /// `error` node; the backend closes like `xenbus_dev_fatal`. It reconnects only after the
    /// frontend has moved on (closed and started again).
    pub fn connect_failed(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.disconnect(&mut out);
        self.switch(XenbusState::Closing, &mut out);
        out
    }

    /// The frontend broke the protocol while connected (bogus `req_prod`): close the VBD.
    pub fn frontend_broken(&mut self) -> Vec<Action> {
        self.connect_failed()
    }

    /// The frontend's `state` node was read (a watch fired, or the control thread polled).
    /// Only a value different from the last one acted upon does something.
    ///
    /// `online` is the toolstack's `online` flag (libxl writes 0 before removing a device).
    pub fn frontend_changed(&mut self, fe: XenbusState, online: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if self.last_fe == Some(fe) {
            return out;
        }
        match fe {
            XenbusState::Initialising | XenbusState::InitWait => {
                self.last_fe = Some(fe);
                // A frontend starting over after Closed (reboot, kexec, driver reload):
                // advertise again (blkback's "prepare for reconnect"). While still probing,
                // nothing to do.
                if self.state == XenbusState::Closed {
                    out.push(Action::Advertise);
                    self.switch(XenbusState::InitWait, &mut out);
                }
            }
            XenbusState::Initialised | XenbusState::Connected => {
                self.last_fe = Some(fe);
                if self.connected {
                    return out;
                }
                match self.state {
                    // We asked the frontend to close (or closed on an error): a Connected it
                    // reports now is the old session, not a new one. Connecting again here is
                    // the second Connect Linux blkfront BUG()s on.
                    XenbusState::Closing => return out,
                    // The frontend started over and we missed its Initialising: advertise
                    // first so the features it reads are ours, then connect (blkback connects
                    // on Initialised/Connected from any state but Connected).
                    XenbusState::Closed | XenbusState::Initialising | XenbusState::Unknown => {
                        out.push(Action::Advertise);
                        self.state = XenbusState::InitWait;
                    }
                    _ => {}
                }
                self.connected = true;
                out.push(Action::Connect);
                self.switch(XenbusState::Connected, &mut out);
            }
            XenbusState::Closing => {
                self.last_fe = Some(fe);
                self.disconnect(&mut out);
                self.switch(XenbusState::Closing, &mut out);
            }
            XenbusState::Unknown
                if !self.connected
                    && matches!(
                        self.state,
                        XenbusState::Initialising | XenbusState::InitWait
                    ) =>
            {
                // No frontend yet (node not written): keep waiting; not a change to act on.
            }
            XenbusState::Closed | XenbusState::Unknown => {
                self.last_fe = Some(fe);
                // Unknown after a handshake means a removed or garbled frontend state node:
                // treat the frontend as gone (Linux blkback unregisters the device).
                self.disconnect(&mut out);
                self.switch(XenbusState::Closed, &mut out);
                if !online {
                    out.push(Action::Remove);
                }
            }
            XenbusState::Reconfiguring | XenbusState::Reconfigured => {
                // Not used by blkif; blkback ignores them too.
                self.last_fe = Some(fe);
            }
        }
        out
    }

    /// The toolstack set `online` to 0 (or removed the backend directory). A connected
    /// frontend is asked to let go first (Remove follows when it reaches Closed); otherwise
    /// the backend goes to Closed at once -- the state libxl waits for before it removes the
    /// directories -- and the device is gone.
    pub fn offline(&mut self, frontend: XenbusState) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(frontend, XenbusState::Closed | XenbusState::Unknown) || !self.connected {
            self.disconnect(&mut out);
            self.switch(XenbusState::Closed, &mut out);
            out.push(Action::Remove);
        } else {
            // Ask the frontend to let go first; Remove follows when it reaches Closed.
            self.switch(XenbusState::Closing, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::XenbusState::*;
    use super::*;

    #[test]
    fn a_frontend_found_initialised_is_connected() {
        // a previous backend wrote InitWait and died; blkfront went on to Initialised
        let mut h = Handshake::new();
        assert_eq!(h.probe(Initialised), vec![Advertise, SwitchState(InitWait)]);
        assert_eq!(
            h.frontend_changed(Initialised, true),
            vec![Connect, SwitchState(Connected)]
        );
        // it closed, and started over before the previous backend followed
        let mut h = Handshake::adopt(Closed, Initialised);
        assert_eq!(
            h.frontend_changed(Initialised, true),
            vec![Advertise, Connect, SwitchState(Connected)]
        );
    }

    #[test]
    fn parse_is_total() {
        assert_eq!(XenbusState::parse("4"), Connected);
        assert_eq!(XenbusState::parse(" 6\n"), Closed);
        assert_eq!(XenbusState::parse("9"), Unknown);
        assert_eq!(XenbusState::parse("-1"), Unknown);
        assert_eq!(XenbusState::parse("banana"), Unknown);
        for n in 0..=8 {
            assert_eq!(XenbusState::parse(&n.to_string()).as_u32(), n);
        }
    }

    #[test]
    fn normal_lifecycle() {
        let mut h = Handshake::new();
        assert_eq!(
            h.probe(Initialising),
            vec![Advertise, SwitchState(InitWait)]
        );
        assert_eq!(h.frontend_changed(Initialising, true), vec![]);
        assert_eq!(
            h.frontend_changed(Initialised, true),
            vec![Connect, SwitchState(Connected)]
        );
        assert!(h.is_connected());
        assert_eq!(h.frontend_changed(Connected, true), vec![]);
        assert_eq!(
            h.frontend_changed(Closing, true),
            vec![Disconnect, SwitchState(Closing)]
        );
        assert_eq!(h.frontend_changed(Closed, true), vec![SwitchState(Closed)]);
        // reboot: the frontend starts over
        assert_eq!(
            h.frontend_changed(Initialising, true),
            vec![Advertise, SwitchState(InitWait)]
        );
        assert_eq!(
            h.frontend_changed(Connected, true),
            vec![Connect, SwitchState(Connected)]
        );
    }

    #[test]
    fn skipped_closing_still_disconnects_once() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        h.frontend_changed(Connected, true);
        assert_eq!(
            h.frontend_changed(Closed, true),
            vec![Disconnect, SwitchState(Closed)]
        );
        assert_eq!(h.frontend_changed(Closed, true), vec![]);
    }

    #[test]
    fn frontend_reconnects_after_closed_without_initialising() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        h.frontend_changed(Connected, true);
        h.frontend_changed(Closing, true);
        h.frontend_changed(Closed, true);
        assert_eq!(
            h.frontend_changed(Initialised, true),
            vec![Advertise, Connect, SwitchState(Connected)]
        );
    }

    #[test]
    fn a_frontend_connected_while_we_close_is_not_reconnected() {
        // Closing is ours: a Connected the frontend reports before it reacted, or reports
        // again, is the old session (reconnecting here is what blkfront BUG()s on).
        let mut h = Handshake::new();
        h.probe(Initialising);
        h.frontend_changed(Connected, true);
        h.frontend_changed(Closing, true);
        assert_eq!(h.frontend_changed(Connected, true), vec![]);
        assert_eq!(h.state(), Closing);
    }

    #[test]
    fn after_closing_on_our_own_the_stale_connected_state_is_not_a_reconnect() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        assert_eq!(
            h.frontend_changed(Connected, true),
            vec![Connect, SwitchState(Connected)]
        );
        // a queue found the ring broken: close, once
        assert_eq!(h.frontend_broken(), vec![Disconnect, SwitchState(Closing)]);
        // the control thread keeps reading the frontend's state: still 4 until it reacts
        for _ in 0..3 {
            assert_eq!(h.frontend_changed(Connected, true), vec![]);
        }
        // the frontend reacts: Closing, then Closed; we follow and never connect
        assert_eq!(h.frontend_changed(Closing, true), vec![]);
        assert_eq!(h.frontend_changed(Closed, true), vec![SwitchState(Closed)]);
        // only a frontend that starts over gets InitWait, then a new connection
        assert_eq!(
            h.frontend_changed(Initialising, true),
            vec![Advertise, SwitchState(InitWait)]
        );
        assert_eq!(
            h.frontend_changed(Initialised, true),
            vec![Connect, SwitchState(Connected)]
        );
    }

    #[test]
    fn a_connected_frontend_never_sees_initwait() {
        // a new backend on a VBD a previous one connected and that cannot be resumed
        let mut h = Handshake::new();
        assert_eq!(h.probe(Connected), vec![SwitchState(Closing)]);
        assert_eq!(h.frontend_changed(Connected, true), vec![]);
        assert_eq!(h.frontend_changed(Closed, true), vec![SwitchState(Closed)]);
    }

    #[test]
    fn a_resumed_backend_writes_nothing_until_the_frontend_moves() {
        let mut h = Handshake::resumed(Connected);
        assert!(h.is_connected());
        assert_eq!(h.frontend_changed(Connected, true), vec![]);
        assert_eq!(
            h.frontend_changed(Closing, true),
            vec![Disconnect, SwitchState(Closing)]
        );
    }

    #[test]
    fn a_frontend_that_closed_while_no_backend_listened_is_followed_after_resume() {
        let mut h = Handshake::resumed(Closing);
        assert_eq!(
            h.frontend_changed(Closing, true),
            vec![Disconnect, SwitchState(Closing)]
        );
    }

    #[test]
    fn an_adopted_backend_does_what_its_predecessor_left_undone() {
        // Closing, and the frontend closed meanwhile: Closed
        let mut h = Handshake::adopt(Closing, Closed);
        assert_eq!(h.frontend_changed(Closed, true), vec![SwitchState(Closed)]);
        // Closed, and the frontend starts over: InitWait
        let mut h = Handshake::adopt(Closed, Initialising);
        assert_eq!(
            h.frontend_changed(Initialising, true),
            vec![Advertise, SwitchState(InitWait)]
        );
        // Closed, and the frontend has not seen it yet: nothing (never reconnect it)
        let mut h = Handshake::adopt(Closed, Connected);
        assert_eq!(h.frontend_changed(Connected, true), vec![]);
    }

    #[test]
    fn an_adopted_closing_backend_follows_the_frontend() {
        let mut h = Handshake::adopt(Closing, Closing);
        assert_eq!(h.frontend_changed(Closing, true), vec![]);
        assert_eq!(
            h.frontend_changed(Closed, false),
            vec![SwitchState(Closed), Remove]
        );
    }

    #[test]
    fn a_failed_disk_taken_offline_goes_to_closed_for_libxl() {
        // open failed: Closing; libxl writes online=0 (and state=5) and waits for Closed
        let mut h = Handshake::new();
        h.probe(Initialising);
        assert_eq!(h.connect_failed(), vec![SwitchState(Closing)]);
        assert_eq!(h.offline(Initialising), vec![SwitchState(Closed), Remove]);
    }

    #[test]
    fn detach_waits_for_frontend_then_removes() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        h.frontend_changed(Connected, true);
        assert_eq!(h.offline(Connected), vec![SwitchState(Closing)]);
        assert_eq!(h.frontend_changed(Closing, false), vec![Disconnect]);
        assert_eq!(
            h.frontend_changed(Closed, false),
            vec![SwitchState(Closed), Remove]
        );
    }

    #[test]
    fn detach_of_unconnected_device_is_immediate() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        assert_eq!(h.offline(InitWait), vec![SwitchState(Closed), Remove]);
    }

    #[test]
    fn missing_frontend_state_before_handshake_is_ignored() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        assert_eq!(h.frontend_changed(Unknown, true), vec![]);
        assert_eq!(h.state(), InitWait);
    }

    #[test]
    fn connect_failure_closes() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        h.frontend_changed(Initialised, true);
        assert_eq!(h.connect_failed(), vec![Disconnect, SwitchState(Closing)]);
        assert!(!h.is_connected());
    }

    #[test]
    fn garbage_frontend_state_is_treated_as_gone() {
        let mut h = Handshake::new();
        h.probe(Initialising);
        h.frontend_changed(Connected, true);
        assert_eq!(
            h.frontend_changed(XenbusState::parse("77"), true),
            vec![Disconnect, SwitchState(Closed)]
        );
    }
}
