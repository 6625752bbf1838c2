DROP TABLE launch_states;
