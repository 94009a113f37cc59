"""Recording, replay and field-test reports of daemon drives (MCAP with Foxglove schemas).

- :mod:`recording.format`: the channels of a recording and how a sensor message is stored
  (its verbatim wire header plus one Foxglove message per buffer: lossless *and* viewable);
- :mod:`recording.writer`: :class:`~recording.writer.Recorder`, a bounded queue and a writer
  thread over size-bounded, rotating MCAP files (the daemon's ``[recording]`` option and
  ``mpnp record``);
- :mod:`recording.reader`: reads our recordings, ROS 2 MCAP files and rosbag2 directories
  (through :mod:`recording.ros2`'s topic map) as one stream of items;
- :mod:`recording.replay`: plays items into a daemon (1x, Nx, as fast as possible), every
  sensor message validated with the protocol's own decoder first;
- :mod:`recording.report`: the drive's timeline PNG and a Markdown summary.

See PROTOCOL.md, "Recording and replay".
"""
