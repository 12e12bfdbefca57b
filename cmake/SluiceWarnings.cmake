# sluice_warnings(target): the warning set every sluice target compiles with.
function(sluice_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                           -Wno-sign-conversion -Wnon-virtual-dtor)
  if(SLUICE_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

# sluice_subsystem(name SOURCES... DEPS...): the object library of one folder of src/. Its
# objects go into libsluice.so and into sluice_static (for tests, which reach internals).
function(sluice_subsystem name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(sluice_${name} OBJECT ${ARG_SOURCES})
  set_property(GLOBAL APPEND PROPERTY SLUICE_SUBSYSTEMS sluice_${name})
  target_include_directories(sluice_${name}
    PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
           $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/src>)
  target_link_libraries(sluice_${name} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  sluice_warnings(sluice_${name})
endfunction()
