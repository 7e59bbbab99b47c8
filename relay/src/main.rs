fn main() {
    let _ = agentrun_relay::app(agentrun_relay::AppState::default());
}
